"""The Synthesize dock widget: sample patches from a prototype-guided diffusion model into napari.

Thin by design: the parameters are the core's :class:`SampleConfig` (the same model
``protodiff sample`` uses); sampling (``core.diffusion.synthesize.sample_images``) and the
nearest-real-patch search (``core.diffusion.fidelity.nearest_real_patches``) run in a
worker thread (:func:`._jobs.synthesize_job`), with a progress step per denoising step
and a Cancel that stops the pipeline at its next step (through its
``callback_on_step_end``); the patches become image layers (:mod:`.synthesis_layers`).

Prototypes are ticked in a list with the colours of the prototype map and the model's
training patches per prototype; picking a prototype on a prototype map of the model's
training store (the Prototypes widget's legend or a click on the map) ticks the same
prototype here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from ..core.diffusion.config import SampleConfig
from ..core.errors import ProtodiffError, validation_message
from . import _jobs
from ._form import ModelForm, Row, cancel_button, path_row, progress_and_status
from .overlays import OVERLAY_KEY
from .prototype_layers import PROTOTYPES, same_file
from .prototype_legend import _swatch
from .synthesis_layers import LAYOUTS, ModelInfo, model_info, prototype_spec, synthesis_layers

SAMPLE_ROWS = {
    "guidance": Row("Guidance scale", decimals=2, step=0.5, maximum=1000),
    "guidance_min_t": Row("Guide while t/T >=", decimals=2, step=0.1),
    "scheduler": Row("Scheduler"),
    "steps": Row("Steps"),
    "n": Row("Count"),
    "seed": Row("Seed"),
}
#: Prototype modes: label shown -> key.
MODES = {"one prototype per patch (cycle over the ticked)": "one",
         "mixture of the ticked (weights in the table)": "mixture",
         "balanced over all prototypes": "balanced"}


class SynthesizeWidget(QWidget):
    """Choose a model, prototypes and sampling parameters; sample in the background into image layers."""

    def __init__(self, napari_viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.info: ModelInfo | None = None
        self._pipe = None  # the loaded pipeline of ``info`` (reused between runs)
        self._worker = None
        self._token = None
        self._pbar = None
        self._linked: set = set()
        self.last_result = None
        """The :class:`.synthesis_layers.Synthesis` of the last finished run."""
        self.last_outcome: _jobs.Outcome | None = None
        self.last_step = 0
        """The last denoising step reported by the running (or last) job."""
        self.layers: list = []
        """The layers the last run added (synthetic patches, then nearest real patches)."""
        self._build()
        self.viewer.layers.events.inserted.connect(self._on_layer_inserted)
        for ly in list(self.viewer.layers):
            self._link(ly)

    # -- layout ------------------------------------------------------------------------
    def _build(self) -> None:
        root = QVBoxLayout(self)

        box = QGroupBox("Model")
        lay = QVBoxLayout(box)
        self.model_edit = path_row(lay, "a model folder made by protodiff train-diffusion", self._pick_model)
        self.model_edit.editingFinished.connect(self.refresh_model)
        self.model_label = QLabel("")
        self.model_label.setWordWrap(True)
        lay.addWidget(self.model_label)
        root.addWidget(box)

        box = QGroupBox("Prototypes")
        lay = QVBoxLayout(box)
        self.mode_combo = QComboBox()
        for label, key in MODES.items():
            self.mode_combo.addItem(label, key)
        self.mode_combo.currentIndexChanged.connect(self._on_mode)
        lay.addWidget(self.mode_combo)
        self.proto_table = QTableWidget(0, 4)
        self.proto_table.setHorizontalHeaderLabels(("Prototype", "Patches", "Share", "Weight"))
        for c, tip in enumerate(("Tick to steer toward it", "Training patches assigned to the prototype",
                                 "Share of the training patches", "Relative weight in the mixture")):
            self.proto_table.horizontalHeaderItem(c).setToolTip(tip)
        self.proto_table.verticalHeader().setVisible(False)
        self.proto_table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.proto_table.setSelectionMode(QAbstractItemView.SelectionMode.NoSelection)
        header = self.proto_table.horizontalHeader()
        header.setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        for c in (1, 2, 3):
            header.setSectionResizeMode(c, QHeaderView.ResizeMode.ResizeToContents)
        self.proto_table.setMinimumHeight(80)
        self.proto_table.setMaximumHeight(260)
        self.proto_table.setToolTip("Tick the prototypes to steer toward; picking a prototype on a prototype map of "
                                    "the model's training store ticks it here")
        lay.addWidget(self.proto_table)
        root.addWidget(box)

        box = QGroupBox("Sampling")
        lay = QVBoxLayout(box)
        self.form = ModelForm(SampleConfig, SAMPLE_ROWS)
        self.form.widgets["guidance"].setMinimum(0.0)
        self.form.set_values(scheduler="ddpm")  # ancestral sampling follows guidance best (docs/diffusion.md)
        lay.addWidget(self.form)
        form = QFormLayout()
        cfg_row = QHBoxLayout()
        self.cfg_check = QCheckBox("on")
        self.cfg_check.setToolTip("Classifier-free guidance (needs a model trained with train-diffusion --cfg)")
        self.cfg_spin = QDoubleSpinBox()
        self.cfg_spin.setRange(0.0, 100.0)
        self.cfg_spin.setSingleStep(0.5)
        self.cfg_spin.setValue(3.0)
        self.cfg_spin.setToolTip(SampleConfig.model_fields["cfg_scale"].description)
        self.cfg_check.toggled.connect(self.cfg_spin.setEnabled)
        self.cfg_spin.setEnabled(False)
        cfg_row.addWidget(self.cfg_check)
        cfg_row.addWidget(self.cfg_spin, 1)
        form.addRow("Classifier-free scale", cfg_row)
        self.layout_combo = QComboBox()
        self.layout_combo.addItems(LAYOUTS)
        self.layout_combo.setToolTip("stack: one patch per slice of the layer; grid: all patches in one mosaic")
        form.addRow("Layout", self.layout_combo)
        self.nearest_check = QCheckBox("show the nearest real patch beside each")
        self.nearest_check.setToolTip("Search the real store for each synthetic patch's nearest patch "
                                      "(the memorisation audit's pixel distance)")
        form.addRow("Nearest real", self.nearest_check)
        self.real_edit = QLineEdit()
        self.real_edit.setPlaceholderText("the model's training store")
        self.real_edit.setToolTip("The real patch store searched for the nearest patches")
        form.addRow("Real store", self.real_edit)
        lay.addLayout(form)
        row = QHBoxLayout()
        self.run_button = QPushButton("Synthesize")
        self.run_button.clicked.connect(self.run)
        self.cancel_button = cancel_button(self.cancel)
        row.addWidget(self.run_button, 1)
        row.addWidget(self.cancel_button)
        lay.addLayout(row)
        self.progress_bar, self.status_label = progress_and_status(lay)
        root.addWidget(box)
        root.addStretch(1)
        self._on_mode()

    # -- the model -----------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        """Whether a sampling job is running."""
        return self._worker is not None

    @property
    def model_path(self) -> str:
        return os.path.expanduser(self.model_edit.text().strip())

    def set_model(self, path: str | os.PathLike) -> None:
        """Choose the model folder (as if typed in) and list its prototypes."""
        self.model_edit.setText(os.fspath(path))
        self.refresh_model()

    def refresh_model(self) -> None:
        """Read the model folder's description (no weights yet); the label says what is wrong."""
        if self.info is not None and same_file(self.info.path, self.model_path):
            return
        self.info, self._pipe = None, None
        self.proto_table.setRowCount(0)
        if not self.model_path:
            self.model_label.setText("")
            return
        try:
            self.info = model_info(self.model_path)
        except ProtodiffError as exc:
            self.model_label.setText(str(exc))
            return
        info = self.info
        self.model_label.setText(info.describe())
        self.real_edit.setText(info.store or "")
        self.cfg_check.setEnabled(info.class_conditional)
        if not info.class_conditional:
            self.cfg_check.setChecked(False)
        if not info.has_classifier:
            self.form.set_values(guidance=0.0)
        total = sum(info.counts) or 1
        self.proto_table.setRowCount(info.k)
        for j in range(info.k):
            item = QTableWidgetItem(f"prototype {j}")
            item.setIcon(_swatch(info.colors[j]))
            item.setFlags(item.flags() | Qt.ItemFlag.ItemIsUserCheckable)
            item.setCheckState(Qt.CheckState.Checked)
            self.proto_table.setItem(j, 0, item)
            cells = (f"{info.counts[j]:,}", f"{info.counts[j] / total:.1%}") if info.counts else ("?", "")
            for c, text in enumerate(cells, start=1):
                it = QTableWidgetItem(text)
                it.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
                self.proto_table.setItem(j, c, it)
            spin = QDoubleSpinBox()
            spin.setRange(0.0, 1000.0)
            spin.setDecimals(2)
            spin.setSingleStep(0.1)
            spin.setValue(1.0)
            spin.setButtonSymbols(QDoubleSpinBox.ButtonSymbols.NoButtons)  # narrow: the names keep their room
            spin.setMaximumWidth(64)
            spin.setToolTip("Relative weight of this prototype in the mixture (normalised over the ticked ones)")
            self.proto_table.setCellWidget(j, 3, spin)
        self._on_mode()
        rows = sum(self.proto_table.rowHeight(j) for j in range(min(info.k, 8)))
        self.proto_table.setFixedHeight(min(260, max(80, rows + self.proto_table.horizontalHeader().height() + 6)))

    def _pick_model(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Diffusion model folder", self.model_path or "")
        if path:
            self.set_model(path)

    # -- prototypes ----------------------------------------------------------------------
    @property
    def mode(self) -> str:
        return self.mode_combo.currentData()

    def set_mode(self, mode: str) -> None:
        self.mode_combo.setCurrentIndex(list(MODES.values()).index(mode))

    def _on_mode(self, *_: Any) -> None:
        self.proto_table.setEnabled(self.mode != "balanced")
        self.proto_table.setColumnHidden(3, self.mode != "mixture")

    @property
    def weights(self) -> dict[int, float]:
        """The mixture weight of every prototype (as typed: not normalised)."""
        return {j: self.proto_table.cellWidget(j, 3).value() for j in range(self.proto_table.rowCount())}

    def set_weights(self, weights: dict[int, float]) -> None:
        """Set the mixture weights of these prototypes (the others keep theirs)."""
        for j, w in weights.items():
            self.proto_table.cellWidget(int(j), 3).setValue(float(w))

    @property
    def checked(self) -> list[int]:
        """The ticked prototypes."""
        return [j for j in range(self.proto_table.rowCount())
                if self.proto_table.item(j, 0).checkState() == Qt.CheckState.Checked]

    def set_checked(self, prototypes) -> None:
        """Tick these prototypes and untick all others."""
        on = {int(p) for p in prototypes}
        for j in range(self.proto_table.rowCount()):
            self.proto_table.item(j, 0).setCheckState(Qt.CheckState.Checked if j in on else Qt.CheckState.Unchecked)

    def _on_layer_inserted(self, event) -> None:
        self._link(event.value)

    def _link(self, layer) -> None:
        """Follow the picks on a prototype map (the Prototypes widget's legend and map clicks set its label)."""
        if layer.metadata.get(OVERLAY_KEY) == PROTOTYPES and layer.unique_id not in self._linked:
            self._linked.add(layer.unique_id)
            layer.events.selected_label.connect(lambda event, ly=layer: self._on_map_pick(ly))

    def _on_map_pick(self, layer) -> None:
        info = self.info
        j = int(layer.selected_label) - 1
        if info is None or not 0 <= j < info.k or self.busy:
            return
        if not same_file(layer.metadata.get("store"), info.store):
            return  # prototypes of another store: the ids would mean something else
        self.set_checked([j])
        if self.mode == "balanced":
            self.set_mode("one")
        self.status_label.setText(f"Prototype {j} picked on the prototype map.")

    # -- parameters ----------------------------------------------------------------------
    def config(self) -> SampleConfig:
        """The sampling configuration shown in the widget (raises on invalid values)."""
        if self.info is None:
            raise ProtodiffError(self.model_label.text() or "Choose a model folder first (made by train-diffusion).")
        values = self.form.values()
        values["prototypes"] = prototype_spec(self.mode, self.checked, self.weights)
        if self.cfg_check.isChecked():
            values["cfg_scale"] = self.cfg_spin.value()
        return SampleConfig(**values, batch_size=max(1, int(values["n"])))

    # -- the job -------------------------------------------------------------------------
    def run(self) -> None:
        """Sample with the shown parameters in the background; the patches become image layers."""
        from pydantic import ValidationError

        from ..core.progress import CancelToken

        if self.busy:
            return
        self.refresh_model()
        try:
            cfg = self.config()
        except (ProtodiffError, ValidationError) as exc:
            self._fail(validation_message(exc))
            return
        nearest = None
        if self.nearest_check.isChecked():
            nearest = os.path.expanduser(self.real_edit.text().strip()) or None
            if nearest is None:
                show_warning("No real patch store is known for this model; the nearest real patches are not shown.")
        from napari.utils import progress

        _jobs.avoid_llvm_clash()  # before the worker imports diffusers
        self.last_step = 0
        self.last_outcome = None
        self._token = CancelToken()
        self._pbar = progress(total=cfg.steps, desc="Synthesize")
        self.status_label.setText("Starting…")
        self._set_running(True)
        self._layout = self.layout_combo.currentText()
        self._worker = _jobs.start(
            _jobs.synthesize_job, self.info.path, cfg, self._token, self._pipe, nearest,
            yielded=self._on_progress, returned=self._on_done, finished=self._on_finished,
        )

    def cancel(self) -> None:
        """Stop the running job at its next denoising step (nothing is added)."""
        if self._token is not None:
            self._token.cancel()
            self.cancel_button.setEnabled(False)
            self.status_label.setText("Cancelling…")

    def _fail(self, message: str) -> None:
        self.status_label.setText(message)
        show_error(message)

    def _on_progress(self, ev) -> None:
        if ev.total > 0:
            self.progress_bar.setRange(0, ev.total)
            self.progress_bar.setValue(min(ev.step, ev.total))
        else:
            self.progress_bar.setRange(0, 0)
        if ev.message.startswith("sampling"):
            self.last_step = ev.step
        self.status_label.setText(ev.message)
        pbar = self._pbar
        if pbar is not None:
            if ev.total and pbar.total != ev.total:
                pbar.total = ev.total
                pbar.n = 0
            pbar.set_description(ev.message[:60])
            if ev.step > pbar.n:
                pbar.update(ev.step - pbar.n)

    def _on_done(self, outcome: _jobs.Outcome) -> None:
        self.last_outcome = outcome
        if outcome.cancelled:
            msg = f"Cancelled at step {self.last_step}; no patches were added."
            self.status_label.setText(msg)
            show_info(msg)
            return
        if outcome.error:
            self._fail(outcome.error)
            return
        syn = outcome.value
        self.last_result = syn
        self._pipe = syn.pipe
        self.layers = [self.viewer.add_image(data, **kwargs) for data, kwargs, _ in
                       synthesis_layers(syn, self._layout)]
        if self.layers:
            self.viewer.layers.selection.active = self.layers[0]
        n = len(syn.images)
        msg = f"{n} patches from {Path(syn.model_dir).name} ({syn.config.steps} steps, seed {syn.config.seed})"
        if syn.nearest is not None:
            copies = int(syn.nearest["near_copy"].sum())
            msg += f"; nearest real patches beside them ({copies} near-copies)"
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(1)
        self.status_label.setText(msg + ".")
        show_info(msg + ".")
        if syn.nearest_error:
            show_warning(f"{syn.nearest_error} The nearest real patches are not shown.")

    def _set_running(self, running: bool) -> None:
        for w in (self.run_button, self.model_edit, self.proto_table, self.mode_combo):
            w.setEnabled(not running)
        if not running:
            self._on_mode()
        self.cancel_button.setEnabled(running)
        if running:
            self.progress_bar.setRange(0, 0)

    def _on_finished(self) -> None:
        self._worker = None
        self._token = None
        if self._pbar is not None:
            self._pbar.close()
            self._pbar = None
        if self.progress_bar.maximum() == 0:
            self.progress_bar.setRange(0, 1)
            self.progress_bar.setValue(0)
        self._set_running(False)
