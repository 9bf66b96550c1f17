"""The Evaluation dock widget: run ``protodiff evaluate mil`` as a job, open its results, overlay attention.

Like the Jobs widget, the evaluation runs as a subprocess (``python -m napari_protodiff.cli
evaluate mil ... -o RUN``) so the viewer never blocks, and its run directory is polled
for the state. When it finishes, "Open results" opens ``outputs/`` (results.json,
predictions.csv, ROC or Kaplan-Meier plots) and "Show attention" draws the attention
map of the selected slide layer over it (:mod:`.attention_layer`). "Watch…" follows an
evaluation started from a terminal. No torch is imported here.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import QProcess, QTimer, QUrl
from qtpy.QtGui import QDesktopServices
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ..core.jobs import RunDir

POLL_MS = 500


class EvaluationWidget(QWidget):
    def __init__(self, napari_viewer=None) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.process: QProcess | None = None
        self.run_dir: Path | None = None
        self._stderr = b""
        root = QVBoxLayout(self)
        form = QFormLayout()
        self.cohort = QLineEdit()
        self.cohort.setPlaceholderText("cohort CSV: slide, patient, label and/or time, event")
        self.store = QLineEdit()
        self.store.setPlaceholderText("patch store with the cohort's slides")
        self.encoder = QLineEdit()
        self.encoder.setPlaceholderText("builtin (or a name, weights file, encoder folder)")
        self.task = QComboBox()
        self.task.addItems(["auto", "classification", "survival"])
        self.loss = QComboBox()
        self.loss.addItems(["nll", "cox"])
        self.folds = QSpinBox()
        self.folds.setRange(2, 50)
        self.folds.setValue(5)
        self.epochs = QSpinBox()
        self.epochs.setRange(1, 10000)
        self.epochs.setValue(40)
        self.run_edit = QLineEdit()
        self.run_edit.setPlaceholderText("run directory (created)")
        for label, w in (("Cohort", self.cohort), ("Store", self.store), ("Encoder", self.encoder), ("Task", self.task),
                         ("Survival loss", self.loss), ("Folds", self.folds), ("Epochs", self.epochs),
                         ("Run directory", self.run_edit)):
            form.addRow(label, w)
        root.addLayout(form)
        row = QHBoxLayout()
        self.start_button = QPushButton("Start")
        self.start_button.clicked.connect(self.start)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.clicked.connect(self.cancel)
        self.watch_button = QPushButton("Watch…")
        self.watch_button.clicked.connect(self._pick_watch)
        self.open_button = QPushButton("Open results")
        self.open_button.clicked.connect(self.open_results)
        self.attention_button = QPushButton("Show attention")
        self.attention_button.setToolTip("Overlay the attention map of the selected slide layer")
        self.attention_button.clicked.connect(self.show_attention)
        for b in (self.start_button, self.cancel_button, self.watch_button, self.open_button, self.attention_button):
            row.addWidget(b)
        root.addLayout(row)
        self.status_label = QLabel("")
        self.status_label.setWordWrap(True)
        root.addWidget(self.status_label)
        root.addStretch(1)
        self.timer = QTimer(self)
        self.timer.setInterval(POLL_MS)
        self.timer.timeout.connect(self.poll)

    @property
    def busy(self) -> bool:
        return self.process is not None and self.process.state() != QProcess.ProcessState.NotRunning

    def command(self) -> list[str]:
        """The ``protodiff evaluate mil`` arguments of the form (ValueError on a bad form)."""
        cohort, store, run = self.cohort.text().strip(), self.store.text().strip(), self.run_edit.text().strip()
        if not cohort or not store:
            raise ValueError("Choose a cohort CSV and the patch store holding its slides.")
        if not run:
            raise ValueError("Choose a run directory for the evaluation.")
        args = ["evaluate", "mil", "--cohort", os.path.expanduser(cohort), "--store", os.path.expanduser(store),
                "-o", os.path.expanduser(run), "--task", self.task.currentText(), "--loss", self.loss.currentText(),
                "--folds", str(self.folds.value()), "--epochs", str(self.epochs.value())]
        if self.encoder.text().strip():
            args += ["--encoder", self.encoder.text().strip()]
        return args

    def start(self, args: list[str] | None = None) -> bool:
        if self.busy:
            return False
        try:
            args = args or self.command()
        except ValueError as exc:
            show_error(str(exc))
            return False
        self.run_dir = Path(args[args.index("-o") + 1])
        self._stderr = b""
        self.status_label.setText("Starting…")
        proc = QProcess(self)
        proc.setProgram(sys.executable)
        proc.setArguments(["-m", "napari_protodiff.cli", *args, "--quiet"])
        proc.readyReadStandardError.connect(self._read_stderr)
        proc.finished.connect(self._on_finished)
        self.process = proc
        proc.start()
        self.timer.start()
        return True

    def cancel(self) -> None:
        if self.busy:
            self.process.kill()
            self.status_label.setText("Cancelled.")

    def _pick_watch(self) -> None:
        d = QFileDialog.getExistingDirectory(self, "Evaluation run directory")
        if d:
            self.watch(d)

    def watch(self, run_dir: str | os.PathLike) -> None:
        if not RunDir.is_run_dir(run_dir):
            show_error(f"{run_dir}: not a protodiff run directory (no run.json).")
            return
        self.run_dir = Path(run_dir)
        self.poll()
        self.timer.start()

    def poll(self) -> None:
        if self.run_dir is None or not RunDir.is_run_dir(self.run_dir):
            return
        rd = RunDir(self.run_dir)
        try:
            st, state = rd.status, rd.state
        except Exception:  # noqa: BLE001 - a file being replaced: next tick
            return
        self.status_label.setText(f"{state}: {st.get('error') or st.get('message') or ''}")
        if not self.busy and state != "running":
            self.timer.stop()

    def _read_stderr(self) -> None:
        if self.process is not None:
            self._stderr += bytes(self.process.readAllStandardError())

    def _on_finished(self, code: int, _status=None) -> None:
        self._read_stderr()
        self.timer.stop()
        proc, self.process = self.process, None
        self.poll()
        err = self._stderr.decode(errors="replace").strip().splitlines()
        last = next((ln for ln in reversed(err) if ln.startswith("protodiff: error: ")), None)
        if code == 0:
            msg = f"Evaluation finished; results in {self.run_dir / 'outputs'}."
            self.status_label.setText(msg)
            show_info(msg)
        else:
            msg = last[len("protodiff: error: "):] if last else (err[-1] if err else f"the job exited with code {code}")
            self.status_label.setText(msg)
            show_error(msg)
        if proc is not None:
            proc.deleteLater()

    def open_results(self) -> Path | None:
        if self.run_dir is None:
            return None
        out = self.run_dir / "outputs"
        QDesktopServices.openUrl(QUrl.fromLocalFile(str(out if out.is_dir() else self.run_dir)))
        return out

    def show_attention(self):
        """Add the attention map of the selected slide layer (from this run) over it."""
        from ..core.errors import ProtodiffError
        from .attention_layer import attention_layer_data

        if self.viewer is None or self.run_dir is None:
            show_error("Run or watch an evaluation first.")
            return None
        layer = self.viewer.layers.selection.active
        if layer is None:
            show_error("Select the slide layer to overlay.")
            return None
        src = getattr(getattr(layer, "source", None), "path", None) or layer.metadata.get("path") or layer.name
        try:
            data, kwargs, _ = attention_layer_data(self.run_dir, str(src), layer)
        except ProtodiffError as exc:
            show_error(str(exc))
            return None
        return self.viewer.add_image(data, **kwargs)
