"""The Prototypes dock widget: embed a patch store, cluster it into prototypes, map them on a slide.

Thin by design: the parameters come from the core's config models (:class:`EmbedConfig`,
:class:`PrototypeConfig`), embedding and k-means run in the core in a worker thread
(see :func:`._jobs.prototypes_job`), and the results become layers aligned to the slide
(see :mod:`.prototype_layers`): a Labels layer with every patch's prototype, and a
gallery of a picked prototype's exemplar patches.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from ..core.embedding import EmbedConfig
from ..core.errors import ProtodiffError, validation_message
from ..core.prototypes import PrototypeConfig
from . import _jobs
from ._form import ModelForm, Row, cancel_button, path_row, progress_and_status
from .overlays import OVERLAY_KEY, SlideFrame
from .prototype_legend import PrototypeLegend
from .prototype_layers import (
    GALLERY,
    PROTOTYPES,
    StoreSlide,
    colormap,
    frame_without_slide,
    gallery_layer_data,
    prototype_layer_data,
    same_file,
    store_slides,
)
from .reader import SLIDE_KEY, slide_layer_data

PROTO_ROWS = {
    "k": Row("Prototypes (k)"),
    "seed": Row("Seed"),
    "normalize": Row("Normalise"),
    "restarts": Row("k-means restarts"),
    "n_exemplars": Row("Exemplars per prototype"),
}
#: The encoder combo's entry for a local weights file, exported encoder folder or run directory.
LOCAL = "local file or folder…"


class PrototypesWidget(QWidget):
    """Embed + cluster a patch store in the background; overlay prototypes on a slide; legend and gallery."""

    def __init__(self, napari_viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self._slides: list[StoreSlide] = []
        self._worker = None
        self._token = None
        self._pbar = None
        self._protos = None  # the store's loaded Prototypes (exemplars) for the layer shown
        self._layer = None  # the prototype Labels layer the legend describes
        self._shown: StoreSlide | None = None  # the store slide it maps
        self._picked: int | None = None
        self._syncing = False
        self.last_result = None
        """``(EmbedResult or None, PrototypeResult)`` of this widget's last finished job."""
        self._build()
        self.viewer.layers.events.removed.connect(self._on_layer_removed)

    # -- layout ------------------------------------------------------------------------
    def _build(self) -> None:
        from ..core.encoders import available_encoders

        root = QVBoxLayout(self)

        box = QGroupBox("Patch store")
        lay = QVBoxLayout(box)
        self.store_edit = path_row(lay, "a patch store folder, e.g. patches.zarr", self._pick_store)
        self.store_edit.editingFinished.connect(self.refresh_store)
        form = QFormLayout()
        self.slide_combo = QComboBox()
        self.slide_combo.setToolTip("The slide to map the prototypes on (completely tiled slides of the store)")
        form.addRow("Slide", self.slide_combo)
        lay.addLayout(form)
        self.store_label = QLabel("")
        self.store_label.setWordWrap(True)
        lay.addWidget(self.store_label)
        root.addWidget(box)

        box = QGroupBox("Encoder")
        form = QFormLayout(box)
        self.encoder_combo = QComboBox()
        self._encoders = {e["name"]: e for e in available_encoders() if e["name"] != "stain-texture"}
        names = ["builtin"] + sorted(n for n in self._encoders if n != "builtin")
        self.encoder_combo.addItems(names + [LOCAL])
        for i, n in enumerate(names):
            self.encoder_combo.setItemData(i, self._encoders[n]["description"], Qt.ItemDataRole.ToolTipRole)
        self.encoder_combo.setToolTip(EmbedConfig.model_fields["encoder"].description)
        self.encoder_combo.currentIndexChanged.connect(self._on_encoder)
        form.addRow("Encoder", self.encoder_combo)
        row = QHBoxLayout()
        self.weights_edit = QLineEdit()
        self.weights_edit.setToolTip("Local weights file (.safetensors, .pt) of a named encoder, or an exported "
                                     "encoder folder / pretraining run directory; nothing is downloaded")
        wfile = QPushButton("File…")
        wfile.clicked.connect(self._pick_weights_file)
        wdir = QPushButton("Folder…")
        wdir.clicked.connect(self._pick_weights_dir)
        row.addWidget(self.weights_edit, 1)
        row.addWidget(wfile)
        row.addWidget(wdir)
        form.addRow("Weights", row)
        self.arch_edit = QLineEdit()
        self.arch_edit.setPlaceholderText("timm architecture, e.g. vit_small_patch16_224")
        self.arch_edit.setToolTip(EmbedConfig.model_fields["arch"].description)
        form.addRow("Architecture", self.arch_edit)
        self.embed_form = ModelForm(EmbedConfig, {"overwrite": Row("Re-embed (overwrite)")})
        form.addRow(self.embed_form)
        root.addWidget(box)
        self._on_encoder()

        box = QGroupBox("Prototypes")
        lay = QVBoxLayout(box)
        self.proto_form = ModelForm(PrototypeConfig, {**PROTO_ROWS, "overwrite": Row("Replace existing (overwrite)")})
        lay.addWidget(self.proto_form)
        row = QHBoxLayout()
        self.run_button = QPushButton("Embed + cluster")
        self.run_button.clicked.connect(self.run)
        self.show_button = QPushButton("Show on slide")
        self.show_button.setToolTip("Map the store's existing prototypes on the chosen slide")
        self.show_button.clicked.connect(lambda: self.show_prototypes())
        self.cancel_button = cancel_button(self.cancel)
        row.addWidget(self.run_button, 1)
        row.addWidget(self.show_button)
        row.addWidget(self.cancel_button)
        lay.addLayout(row)
        self.progress_bar, self.status_label = progress_and_status(lay)
        root.addWidget(box)

        box = QGroupBox("Legend")
        lay = QVBoxLayout(box)
        hint = QLabel("Tick to show or hide a prototype; pick a row, or click the map, for its exemplar patches.")
        hint.setWordWrap(True)
        lay.addWidget(hint)
        self.legend = PrototypeLegend()
        self.legend.picked.connect(self._on_legend_pick)
        self.legend.visibility_changed.connect(self._apply_hidden)
        lay.addWidget(self.legend)
        row = QHBoxLayout()
        show_all = QPushButton("Show all")
        show_all.clicked.connect(lambda: self.set_hidden(()))
        hide_all = QPushButton("Hide all")
        hide_all.clicked.connect(lambda: self.set_hidden(range(self.legend.rowCount())))
        row.addWidget(show_all)
        row.addWidget(hide_all)
        row.addStretch(1)
        lay.addLayout(row)
        root.addWidget(box, 1)

    # -- store and slides ----------------------------------------------------------------
    @property
    def busy(self) -> bool:
        """Whether an embed + cluster job is running."""
        return self._worker is not None

    @property
    def store_path(self) -> str:
        return os.path.expanduser(self.store_edit.text().strip())

    @property
    def store_slide(self) -> StoreSlide | None:
        """The store slide chosen in the combo (or ``None``)."""
        i = self.slide_combo.currentIndex()
        return self._slides[i] if 0 <= i < len(self._slides) else None

    def set_store(self, path: str | os.PathLike) -> None:
        """Choose the patch store (as if typed in) and list its slides."""
        self.store_edit.setText(os.fspath(path))
        self.refresh_store()

    def refresh_store(self) -> None:
        """List the store's completely tiled slides in the combo (quietly: the status line says what is wrong)."""
        current = self.store_slide.slide_id if self.store_slide else None
        self._slides = []
        text = ""
        if self.store_path:
            try:
                self._slides = store_slides(self.store_path)
                n = sum(s.n_patches for s in self._slides)
                text = f"{len(self._slides)} slide(s), {n:,} patches." + self._prototype_summary()
            except ProtodiffError as exc:
                text = str(exc)
        self.store_label.setText(text)
        self.slide_combo.clear()
        self.slide_combo.addItems([s.slide_id for s in self._slides])
        ids = [s.slide_id for s in self._slides]
        self.slide_combo.setCurrentIndex(ids.index(current) if current in ids else (0 if ids else -1))

    def _prototype_summary(self) -> str:
        from ..core.prototypes import prototype_status
        from ..core.store import PatchStore

        st = PatchStore(self.store_path)
        status = prototype_status(st)
        if status == "complete":
            a = st.root["prototypes"].attrs["protodiff"]
            return f" Prototypes: k = {a.get('k')} (encoder {a.get('encoder_key')})."
        return " Prototypes: interrupted fit." if status else " No prototypes yet."

    def _pick_store(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Patch store (a .zarr folder)", self.store_path or "")
        if path:
            self.set_store(path)

    def _on_encoder(self, *_: Any) -> None:
        name = self.encoder_combo.currentText()
        local = name == LOCAL
        needs = local or self._encoders.get(name, {}).get("needs_weights", False)
        self.weights_edit.setEnabled(needs)
        self.arch_edit.setEnabled(local)
        self.weights_edit.setPlaceholderText(
            "weights file, exported encoder folder or run directory" if local
            else "local weights file (.safetensors, .pt)" if needs else "not needed")

    def _pick_weights_file(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Encoder weights", "",
                                              "Weights (*.safetensors *.pt *.pth *.bin *.ckpt);;All files (*)")
        if path:
            self.weights_edit.setText(path)

    def _pick_weights_dir(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Exported encoder folder or pretraining run directory")
        if path:
            self.weights_edit.setText(path)
            self.encoder_combo.setCurrentText(LOCAL)

    # -- parameters ----------------------------------------------------------------------
    def configs(self) -> tuple[EmbedConfig, PrototypeConfig]:
        """The embedding and prototype configurations shown in the widget (raises on invalid values)."""
        name = self.encoder_combo.currentText()
        weights = self.weights_edit.text().strip() or None
        if name == LOCAL:
            if not weights:
                raise ProtodiffError("Choose the encoder's weights file or folder (Weights: File… or Folder…).")
            enc = dict(encoder=os.path.expanduser(weights), arch=self.arch_edit.text().strip() or None)
        elif self._encoders.get(name, {}).get("needs_weights"):
            enc = dict(encoder=name, weights=os.path.expanduser(weights) if weights else None)
        else:
            enc = dict(encoder=None if name == "builtin" else name)
        return EmbedConfig(**enc, **self.embed_form.values()), PrototypeConfig(**self.proto_form.values())

    # -- the job -------------------------------------------------------------------------
    def run(self) -> None:
        """Embed the store (if needed) and fit prototypes in the background; then map them on the chosen slide."""
        from pydantic import ValidationError

        from ..core.progress import CancelToken

        if self.busy:
            return
        if not self.store_path:
            show_error("Choose a patch store first (a .zarr folder made by the Slides widget or protodiff tile).")
            return
        try:
            embed_cfg, proto_cfg = self.configs()
        except (ProtodiffError, ValidationError) as exc:
            show_error(validation_message(exc))
            return
        from napari.utils import progress

        self._token = CancelToken()
        self._pbar = progress(total=0, desc="Prototypes")
        self.status_label.setText("Starting…")
        self._set_running(True)
        self._worker = _jobs.start(
            _jobs.prototypes_job, self.store_path, embed_cfg, proto_cfg, self._token,
            yielded=self._on_progress, returned=self._on_done, finished=self._on_finished,
        )

    def cancel(self) -> None:
        """Ask the running job to stop at its next check (embedding resumes later; no prototypes are written)."""
        if self._token is not None:
            self._token.cancel()
            self.cancel_button.setEnabled(False)
            self.status_label.setText("Cancelling…")

    def _on_progress(self, ev) -> None:
        if ev.total > 0:
            self.progress_bar.setRange(0, ev.total)
            self.progress_bar.setValue(min(ev.step, ev.total))
        else:
            self.progress_bar.setRange(0, 0)
        rate = ev.metrics.get("patches_per_second")
        self.status_label.setText(ev.message + (f" ({rate:.0f} patches/s)" if rate else ""))
        pbar = self._pbar
        if pbar is not None:
            if ev.total and pbar.total != ev.total:
                pbar.total = ev.total
                pbar.n = 0
            pbar.set_description(ev.message[:60])
            if ev.step > pbar.n:
                pbar.update(ev.step - pbar.n)

    def _on_done(self, outcome: _jobs.Outcome) -> None:
        if outcome.cancelled:
            msg = ("Cancelled; finished embedding chunks are kept (running again resumes them), "
                   "no prototypes were written.")
            self.status_label.setText(msg)
            show_info(msg)
            return
        if outcome.error:
            self.status_label.setText(outcome.error)
            show_error(outcome.error)
            return
        self.last_result = outcome.value
        embedded, fitted = outcome.value
        msg = (f"{fitted.k} prototypes of {fitted.n_patches:,} patches (encoder {fitted.encoder_key}, "
               f"seed {fitted.seed}) in {fitted.seconds:.1f} s")
        if embedded is not None:
            msg = f"Embedded {embedded.patches_embedded:,} patches in {embedded.seconds:.1f} s; " + msg
        else:
            msg += "; embeddings already in the store"
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(1)
        self.status_label.setText(msg + ".")
        show_info(msg + ".")
        self.refresh_store()
        self.show_prototypes()

    def _set_running(self, running: bool) -> None:
        for w in (self.run_button, self.show_button, self.store_edit, self.slide_combo):
            w.setEnabled(not running)
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

    # -- layers --------------------------------------------------------------------------
    def slide_layer_for(self, s: StoreSlide, open_if_needed: bool = True):
        """The viewer's layer of the slide ``s`` was tiled from (opened with the reader if it is not open)."""
        for ly in self.viewer.layers:
            if ly.metadata.get(SLIDE_KEY) and same_file(ly.metadata.get("path"), s.path):
                return ly
        if not open_if_needed or not s.path:
            return None
        data, kwargs, _ = slide_layer_data(s.path, s.mpp_override)
        if kwargs["metadata"]["units_warning"]:
            show_warning(kwargs["metadata"]["units_warning"])
        layer = self.viewer.add_image(data, **kwargs)
        self.viewer.canvas.overlays.scale_bar.visible = True
        return layer

    def _layers(self, kind: str, slide_path: str) -> list:
        return [ly for ly in self.viewer.layers
                if ly.metadata.get(OVERLAY_KEY) == kind and ly.metadata.get("slide_path") == slide_path]

    def show_prototypes(self, slide_id: str | None = None):
        """Map the store's prototypes on a slide (the chosen one by default) as a Labels layer; returns it."""
        from napari.layers import Layer

        from ..core.prototypes import load_prototypes

        s = self.store_slide if slide_id is None else next((x for x in self._slides if x.slide_id == slide_id), None)
        if s is None:
            show_error(f"{self.store_path or 'The patch store'}: choose a store with completely tiled slides first.")
            return None
        try:
            slide_layer = self.slide_layer_for(s)
        except ProtodiffError as exc:
            show_warning(f"{exc} The prototypes are drawn without the slide.")
            slide_layer = None
        frame = SlideFrame.of(slide_layer) if slide_layer is not None else frame_without_slide(s)
        try:
            protos = load_prototypes(s.store)
            data, kwargs, kind = prototype_layer_data(s.store, s.slide_id, frame)
        except ProtodiffError as exc:
            show_error(str(exc))
            return None
        existing = self._layers(PROTOTYPES, frame.path) if frame.path else []
        if existing:  # update in place: keeps the user's display settings
            layer = existing[0]
            layer.metadata = kwargs["metadata"]
            layer.data = data
            layer.scale, layer.translate = kwargs["scale"], kwargs["translate"]
            layer.features = kwargs["features"]
            layer.colormap = kwargs["colormap"]
        else:
            layer = self.viewer.add_layer(Layer.create(data, kwargs, kind))
            layer.mouse_drag_callbacks.append(self._on_click)
            layer.events.selected_label.connect(self._on_selected_label)
        self._protos, self._layer, self._shown, self._picked = protos, layer, s, None
        self.viewer.canvas.overlays.scale_bar.visible = True
        self.legend.fill(layer.features, layer.metadata["colors"])
        if slide_layer is not None:
            self.viewer.layers.selection.active = layer
        for g in self._layers(GALLERY, frame.path):
            self.viewer.layers.remove(g)  # exemplars of an older fit
        return layer

    @property
    def prototypes_layer(self):
        """The Labels layer the legend describes (``None`` before one is shown or after it was closed)."""
        ly = self._layer
        if ly is None or all(x.unique_id != ly.unique_id for x in self.viewer.layers):
            return None
        return ly

    def _on_layer_removed(self, event=None) -> None:
        if self._layer is not None and self.prototypes_layer is None:  # the map was closed
            self._layer, self._protos, self._shown, self._picked = None, None, None, None
            self.legend.setRowCount(0)

    # -- showing and hiding --------------------------------------------------------------
    @property
    def hidden(self) -> list[int]:
        """The prototypes unticked in the legend."""
        return self.legend.hidden

    def set_hidden(self, prototypes) -> None:
        """Hide these prototypes (and show all others)."""
        self.legend.set_hidden(prototypes)

    def _apply_hidden(self) -> None:
        layer = self.prototypes_layer
        if layer is not None:
            layer.colormap = colormap(np.asarray(layer.metadata["colors"]), self.hidden)

    # -- picking -------------------------------------------------------------------------
    @property
    def picked(self) -> int | None:
        """The prototype whose exemplars are shown (``None``: none)."""
        return self._picked

    def pick(self, prototype: int):
        """Show ``prototype``'s exemplar patches as a gallery layer beside the slide; returns the layer."""
        from napari.layers import Layer

        layer = self.prototypes_layer
        if layer is None or not 0 <= prototype < self.legend.rowCount():
            return None
        md, s = layer.metadata, self._shown
        self._picked = prototype
        self._syncing = True
        try:
            self.legend.select(prototype)
            layer.selected_label = prototype + 1
        finally:
            self._syncing = False
        slide_layer = self.slide_layer_for(s, open_if_needed=False)
        frame = SlideFrame.of(slide_layer) if slide_layer is not None else frame_without_slide(s)
        try:
            data, kwargs, kind = gallery_layer_data(md["store"], prototype, frame, s, np.asarray(md["colors"]),
                                                    protos=self._protos)
        except ProtodiffError as exc:
            show_error(str(exc))
            return None
        old = self._layers(GALLERY, md["slide_path"])
        if old:
            g = old[0]
            g.metadata = kwargs["metadata"]
            g.data = data
            g.scale, g.translate = kwargs["scale"], kwargs["translate"]
            g.name = kwargs["name"]
        else:
            g = self.viewer.add_layer(Layer.create(data, kwargs, kind))
        self.viewer.layers.selection.active = layer  # keep clicks on the map picking
        return g

    def _on_legend_pick(self, prototype: int) -> None:
        if not self._syncing:
            self.pick(prototype)

    def _on_selected_label(self, event=None) -> None:
        layer = self.prototypes_layer
        if self._syncing or layer is None:
            return
        j = int(layer.selected_label) - 1
        if 0 <= j < self.legend.rowCount() and j != self._picked:
            self.pick(j)

    def pick_at(self, world_position) -> int | None:
        """Pick the prototype under a world position (µm) of the map, as a click there does; returns it."""
        layer = self.prototypes_layer
        if layer is None:
            return None
        value = layer.get_value(tuple(world_position), world=True)
        if value is None or int(value) <= 0:
            return None
        self.pick(int(value) - 1)
        return int(value) - 1

    def _on_click(self, layer, event):
        """Mouse callback of the map: a click (not a drag) picks the prototype under it."""
        if event.type != "mouse_press" or getattr(event, "button", 1) != 1:
            return
        start = np.asarray(event.position, float)
        yield
        while event.type == "mouse_move":
            yield
        cell = float(np.min(np.abs(layer.scale)))
        if np.linalg.norm(np.asarray(event.position, float) - start) <= cell / 2:
            self.pick_at(start)
