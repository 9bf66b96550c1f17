"""The Jobs widget's forms: one per kind of job, each turning its fields into ``protodiff`` arguments.

Every form's :meth:`~JobForm.args` returns the arguments of the same command a person
would type (``pretrain ...``, ``evaluate probe ...``, ``evaluate mil ...``, ``study ...``)
or raises ValueError with one sentence. Parameters that have a config model (MILConfig,
ProbeConfig, PretrainConfig) take their bounds, defaults and tooltips from it.
"""

from __future__ import annotations

import os

from qtpy.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QWidget,
)

from ._form import ModelForm, Row


def path_list(text: str) -> list[str]:
    return [os.path.expanduser(s.strip()) for s in text.split(";") if s.strip()]


def path_row(placeholder: str, pick) -> tuple[QLineEdit, QWidget]:
    """A line edit with a "…" button calling ``pick(edit)``."""
    w = QWidget()
    lay = QHBoxLayout(w)
    lay.setContentsMargins(0, 0, 0, 0)
    edit = QLineEdit()
    edit.setPlaceholderText(placeholder)
    b = QPushButton("…")
    b.setMaximumWidth(32)
    b.clicked.connect(lambda: pick(edit))
    lay.addWidget(edit, 1)
    lay.addWidget(b)
    return edit, w


def pick_dir(title: str, append: bool = False):
    def pick(edit: QLineEdit) -> None:
        if p := QFileDialog.getExistingDirectory(edit, title, ""):
            edit.setText(";".join([*path_list(edit.text()), p]) if append else p)
    return pick


def pick_file(title: str, filters: str = ""):
    def pick(edit: QLineEdit) -> None:
        p, _ = QFileDialog.getOpenFileName(edit, title, "", filters)
        if p:
            edit.setText(p)
    return pick


def encoder_edit() -> QLineEdit:
    edit = QLineEdit()
    edit.setPlaceholderText("builtin (or a name, weights file, encoder folder)")
    edit.setToolTip("Encoder name or path (the built-in encoder when empty).")
    return edit


def _encoder_args(edit: QLineEdit) -> list[str]:
    return ["--encoder", edit.text().strip()] if edit.text().strip() else []


def _required(edit: QLineEdit, what: str) -> str:
    text = edit.text().strip()
    if not text:
        raise ValueError(f"Choose {what}.")
    return os.path.expanduser(text)


class JobForm(QWidget):
    """A form for one kind of job."""

    title = ""
    kind = ""  # the run directory kind it makes (run.json)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.form = QFormLayout(self)
        self.form.setContentsMargins(0, 0, 0, 0)

    def args(self, run: str) -> list[str]:
        raise NotImplementedError


class PretrainForm(JobForm):
    title, kind = "DINO pretraining", "pretrain"

    def __init__(self, parent: QWidget | None = None) -> None:
        from ..core.ssl.config import PRESETS, PretrainConfig

        super().__init__(parent)
        f = PretrainConfig.model_fields
        self.real_edit, row = path_row("real patch store(s), ';'-separated", pick_dir("Real patch store", True))
        self.form.addRow("Real stores", row)
        self.synth_edit, row = path_row("synthetic store(s), ';'-separated (optional)",
                                        pick_dir("Synthetic patch store", True))
        self.form.addRow("Synthetic stores", row)
        self.fraction = QDoubleSpinBox()
        self.fraction.setRange(0.0, 1.0)
        self.fraction.setDecimals(2)
        self.fraction.setSingleStep(0.05)
        self.fraction.setValue(1.0)
        self.fraction.setToolTip(f["real_fraction"].description)
        self.form.addRow("Real fraction", self.fraction)
        self.preset = QComboBox()
        self.preset.addItems(list(PRESETS))
        self.preset.setToolTip(f["preset"].description)
        self.form.addRow("Preset", self.preset)
        self.arch = QComboBox()
        self.arch.addItems(["vit_tiny", "vit_small", "vit_base"])
        self.form.addRow("Architecture", self.arch)
        self.epochs, self.batch, self.images = QSpinBox(), QSpinBox(), QSpinBox()
        for box, top, label in ((self.epochs, 100000, "Epochs"), (self.batch, 65536, "Batch size"),
                                (self.images, 10**9, "Images per epoch")):
            box.setRange(0, top)
            box.setSpecialValueText("preset")
            self.form.addRow(label, box)
        self.workers = QSpinBox()
        self.workers.setRange(0, 64)
        self.workers.setValue(min(2, os.cpu_count() or 1))
        self.form.addRow("Loader workers", self.workers)

    def args(self, run: str) -> list[str]:
        real, synth = path_list(self.real_edit.text()), path_list(self.synth_edit.text())
        if not real and not synth:
            raise ValueError("Choose at least one patch store (real or synthetic).")
        out = ["pretrain", "-o", run]
        for p in real:
            out += ["--real", p]
        for p in synth:
            out += ["--synthetic", p]
        out += ["--real-fraction", f"{self.fraction.value():g}", "--preset", self.preset.currentText(),
                "--arch", self.arch.currentText(), "--workers", str(self.workers.value())]
        for flag, box in (("--epochs", self.epochs), ("--batch-size", self.batch), ("--images-per-epoch", self.images)):
            if box.value() > 0:
                out += [flag, str(box.value())]
        return out


class ProbeForm(JobForm):
    title, kind = "Probe (labelled patches)", "evaluate-probe"

    def __init__(self, parent: QWidget | None = None) -> None:
        from ..core.evaluation.probe import ProbeConfig

        super().__init__(parent)
        self.patches, row = path_row("class folders, a path,label[,group] CSV, or a labelled store",
                                     pick_dir("Labelled patches"))
        self.form.addRow("Patches", row)
        self.encoder = encoder_edit()
        self.form.addRow("Encoder", self.encoder)
        self.params = ModelForm(ProbeConfig, {"folds": Row("Folds"), "k": Row("k-NN neighbours"),
                                              "seed": Row("Seed")})
        self.form.addRow(self.params)

    def args(self, run: str) -> list[str]:
        v = self.params.values()
        out = ["evaluate", "probe", "--patches", _required(self.patches, "a labelled patch set"), "-o", run,
               "--folds", str(v["folds"]), "--k", str(v["k"]), "--seed", str(v["seed"])]
        return out + _encoder_args(self.encoder)


class MILForm(JobForm):
    title, kind = "ABMIL (slide cohort)", "evaluate-mil"

    def __init__(self, parent: QWidget | None = None) -> None:
        from ..core.evaluation.mil import MILConfig

        super().__init__(parent)
        self.cohort, row = path_row("cohort CSV: slide, patient, label and/or time, event",
                                    pick_file("Cohort CSV", "CSV (*.csv)"))
        self.form.addRow("Cohort", row)
        self.store, row = path_row("patch store holding the cohort's slides", pick_dir("Patch store"))
        self.form.addRow("Store", row)
        self.encoder = encoder_edit()
        self.form.addRow("Encoder", self.encoder)
        self.params = ModelForm(MILConfig, {"task": Row("Task"), "loss": Row("Survival loss"), "folds": Row("Folds"),
                                            "epochs": Row("Epochs"), "seed": Row("Seed")})
        self.form.addRow(self.params)

    def args(self, run: str) -> list[str]:
        cohort = _required(self.cohort, "a cohort CSV")
        store = _required(self.store, "the patch store holding the cohort's slides")
        v = self.params.values()
        out = ["evaluate", "mil", "--cohort", cohort, "--store", store, "-o", run, "--task", v["task"],
               "--loss", v["loss"], "--folds", str(v["folds"]), "--epochs", str(v["epochs"]), "--seed", str(v["seed"])]
        return out + _encoder_args(self.encoder)


class StudyForm(JobForm):
    title, kind = "Data-efficiency study", "study"

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.config, row = path_row("study config (JSON or YAML)",
                                    pick_file("Study config", "Study config (*.json *.yaml *.yml)"))
        self.form.addRow("Config", row)

    def args(self, run: str) -> list[str]:
        return ["study", _required(self.config, "a study config file"), "-o", run]


FORMS = (PretrainForm, ProbeForm, MILForm, StudyForm)
SUBCOMMANDS = ("pretrain", "evaluate", "study")


def command_of(argv: list[str]) -> list[str] | None:
    """The ``protodiff`` arguments in a run's recorded command line (manifest ``argv``), without --resume/--quiet."""
    i = next((k for k, a in enumerate(argv) if a in SUBCOMMANDS), None)
    if i is None:
        return None
    return [a for a in argv[i:] if a not in ("--resume", "--quiet")]
