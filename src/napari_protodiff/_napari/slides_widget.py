"""The Slides dock widget: open a slide, preview tissue and patch grid, tile into a patch store.

Thin by design: parameters come from the core's config models (:class:`TilingConfig`,
:class:`TissueParams`), computation runs in the core in a worker thread, and results
become layers aligned to the slide (see :mod:`.overlays`).
"""

from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Any

from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from ..core.errors import ProtodiffError, validation_message
from ..core.slide import MPP_PLAUSIBLE, SUPPORTED_EXTENSIONS
from ..core.tiling import TilingConfig
from ..core.tissue import TissueParams
from . import _jobs
from ._form import ModelForm, Row, cancel_button, path_row, progress_and_status
from .overlays import OVERLAY_KEY, SlideFrame, apply_style
from .reader import SLIDE_KEY, slide_layer_data

PATCH_ROWS = {
    "size": Row("Patch size (px)", step=32),
    "mpp": Row("Resolution (µm/px)", decimals=3, step=0.25),
    "min_tissue": Row("Min tissue fraction", decimals=2, step=0.05),
    "workers": Row("Workers", maximum=os.cpu_count() or 1),
}
TISSUE_ROWS = {
    "mask_mpp": Row("Mask resolution (µm/px)", decimals=1, step=1),
    "min_saturation": Row("Min saturation", decimals=3, step=0.01),
    "max_brightness": Row("Max brightness (glass)", decimals=3, step=0.01),
    "min_brightness": Row("Min brightness (ink)", decimals=3, step=0.01),
    "reject_ink": Row("Reject pen ink"),
    "min_object_um2": Row("Min object (µm²)", decimals=0, step=1000),
    "max_hole_um2": Row("Fill holes below (µm²)", decimals=0, step=1000),
}


class SlidesWidget(QWidget):
    """Open a slide, show its metadata, preview tissue + patch grid, tile it into a patch store."""

    def __init__(self, napari_viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self._slides: list = []  # slide layers listed in the combo, same order
        self._worker = None
        self._token = None
        self._pbar = None
        self.last_result = None
        """The last :class:`~napari_protodiff.core.tiling.TilingResult` of this widget."""
        self._build()
        self.viewer.layers.events.inserted.connect(self._refresh_slides)
        self.viewer.layers.events.removed.connect(self._refresh_slides)
        self.viewer.layers.events.renamed.connect(self._refresh_slides)
        self._refresh_slides()

    # -- layout ------------------------------------------------------------------------
    def _build(self) -> None:
        root = QVBoxLayout(self)

        box = QGroupBox("Slide")
        lay = QVBoxLayout(box)
        row = QHBoxLayout()
        self.slide_combo = QComboBox()
        self.slide_combo.setToolTip("Slide layers opened with napari-protodiff")
        self.slide_combo.currentIndexChanged.connect(self._on_slide_selected)
        self.open_button = QPushButton("Open…")
        self.open_button.clicked.connect(self._pick_slide)
        row.addWidget(self.slide_combo, 1)
        row.addWidget(self.open_button)
        lay.addLayout(row)
        self.info_label = QLabel("No slide open.")
        self.info_label.setWordWrap(True)
        self.info_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        lay.addWidget(self.info_label)
        form = QFormLayout()
        self.mpp_override = QDoubleSpinBox()
        self.mpp_override.setDecimals(4)
        self.mpp_override.setRange(0.0, MPP_PLAUSIBLE[1])
        self.mpp_override.setSingleStep(0.05)
        self.mpp_override.setSpecialValueText("from file")
        self.mpp_override.setSuffix(" µm/px")
        self.mpp_override.setKeyboardTracking(False)
        self.mpp_override.setToolTip(TilingConfig.model_fields["mpp_override"].description)
        self.mpp_override.valueChanged.connect(self._on_override)
        form.addRow("mpp override", self.mpp_override)
        lay.addLayout(form)
        root.addWidget(box)

        box = QGroupBox("Patches")
        lay = QVBoxLayout(box)
        self.patch_form = ModelForm(TilingConfig, PATCH_ROWS)
        lay.addWidget(self.patch_form)
        root.addWidget(box)

        box = QGroupBox("Tissue detection")
        lay = QVBoxLayout(box)
        self.tissue_form = ModelForm(TissueParams, TISSUE_ROWS)
        lay.addWidget(self.tissue_form)
        root.addWidget(box)

        self.preview_button = QPushButton("Preview tissue and patches")
        self.preview_button.clicked.connect(self.preview)
        root.addWidget(self.preview_button)
        self.preview_label = QLabel("")
        self.preview_label.setWordWrap(True)
        root.addWidget(self.preview_label)

        box = QGroupBox("Patch store")
        lay = QVBoxLayout(box)
        self.store_edit = path_row(lay, "output folder, e.g. patches.zarr", self._pick_store)
        self.store_form = ModelForm(TilingConfig, {"compression": Row("Compression"),
                                                   "overwrite": Row("Re-tile slides already in the store")})
        lay.addWidget(self.store_form)
        row = QHBoxLayout()
        self.tile_button = QPushButton("Tile into store")
        self.tile_button.clicked.connect(self.tile)
        self.cancel_button = cancel_button(self.cancel)
        row.addWidget(self.tile_button, 1)
        row.addWidget(self.cancel_button)
        lay.addLayout(row)
        self.progress_bar, self.status_label = progress_and_status(lay)
        root.addWidget(box)
        root.addStretch(1)

    # -- the current slide ---------------------------------------------------------------
    @property
    def slide_layer(self):
        """The slide layer selected in the combo (or ``None``)."""
        i = self.slide_combo.currentIndex()
        return self._slides[i] if 0 <= i < len(self._slides) else None

    @property
    def busy(self) -> bool:
        """Whether a preview or tiling job is running."""
        return self._worker is not None

    def _refresh_slides(self, event=None) -> None:
        # Layers are compared by unique_id: napari hands plugins proxies, so identity fails.
        current = self.slide_layer
        if event is not None and event.type == "inserted" and self._is_slide(event.value):
            current = event.value  # a newly opened slide becomes the current one
        current_id = current.unique_id if current is not None else None
        self._slides = [ly for ly in self.viewer.layers if self._is_slide(ly)]
        self.slide_combo.blockSignals(True)
        self.slide_combo.clear()
        self.slide_combo.addItems([ly.name for ly in self._slides])
        idx = next((i for i, ly in enumerate(self._slides) if ly.unique_id == current_id), 0 if self._slides else -1)
        self.slide_combo.setCurrentIndex(idx)
        self.slide_combo.blockSignals(False)
        self._on_slide_selected()

    @staticmethod
    def _is_slide(layer) -> bool:
        return bool(layer.metadata.get(SLIDE_KEY)) and "path" in layer.metadata

    def open_path(self, path: str | os.PathLike, mpp_override: float | None = None):
        """Open a slide as a new layer (and select it); returns the layer, or ``None`` after a notification."""
        try:
            data, kwargs, _ = slide_layer_data(path, mpp_override)
        except ProtodiffError as exc:
            show_error(str(exc))
            return None
        if kwargs["metadata"]["units_warning"]:
            show_warning(kwargs["metadata"]["units_warning"])
        layer = self.viewer.add_image(data, **kwargs)
        self.viewer.canvas.overlays.scale_bar.visible = True
        return layer

    def _pick_slide(self) -> None:
        patterns = " ".join(f"*{e}" for e in sorted(SUPPORTED_EXTENSIONS))
        path, _ = QFileDialog.getOpenFileName(self, "Open a slide", "", f"Slides ({patterns});;All files (*)")
        if path:
            self.open_path(path)

    def _on_slide_selected(self, *_: Any) -> None:
        layer = self.slide_layer
        self.mpp_override.blockSignals(True)
        self.mpp_override.setValue((layer.metadata.get("mpp_override") or 0.0) if layer else 0.0)
        self.mpp_override.blockSignals(False)
        self.info_label.setText(self._info_html(layer) if layer else "No slide open.")

    @staticmethod
    def _info_html(layer) -> str:
        info = layer.metadata["slide_info"]
        w, h = info["dimensions"]
        downs = ", ".join(f"{lv['downsample']:g}" for lv in info["levels"])
        if info["mpp"] is not None:
            mpp = f"{info['mpp']:.4g} µm/px ({info['mpp_source']})"
            if info["mpp_source"] == "override" and info["mpp_problem"]:
                mpp += f"; file: {info['mpp_problem']}"
        else:
            mpp = f"<b style='color:#ff9f43'>unknown</b>: {info['mpp_problem']}; set the mpp override"
        obj = f"{info['objective_power']:g}×" if info.get("objective_power") else "unknown"
        rows = [
            ("File", Path(info["path"]).name),
            ("Size", f"{w:,} × {h:,} px" + (f" = {w * info['mpp'] / 1000:.2f} × {h * info['mpp'] / 1000:.2f} mm"
                                            if info["mpp"] else "")),
            ("Levels", f"{len(info['levels'])} (downsamples {downs})"),
            ("Pixel size", mpp),
            ("Objective", obj),
            ("Vendor", f"{info.get('vendor') or 'unknown'} ({info['backend']})"),
            ("Associated", ", ".join(info.get("associated_images") or []) or "none"),
        ]
        cells = "".join(
            f"<tr><td style='padding-right:8px'><b>{k}</b></td><td>{v if k == 'Pixel size' else html.escape(str(v))}</td></tr>"
            for k, v in rows
        )
        return f"<table>{cells}</table>"

    def _on_override(self, value: float) -> None:
        layer = self.slide_layer
        if layer is None:
            return
        override = value or None
        try:
            _, kwargs, _ = slide_layer_data(layer.metadata["path"], override)
        except ProtodiffError as exc:
            show_error(str(exc))
            self._on_slide_selected()  # back to the layer's current value
            return
        self._remove_overlays(layer.metadata["path"])  # drawn with the old pixel size
        layer.metadata = kwargs["metadata"]
        layer.units = kwargs["units"]
        layer.scale = kwargs["scale"]
        if kwargs["metadata"]["units_warning"]:
            show_warning(kwargs["metadata"]["units_warning"])
        self.viewer.reset_view()
        self._on_slide_selected()

    # -- parameters ----------------------------------------------------------------------
    def config(self) -> TilingConfig:
        """The tiling configuration shown in the widget (raises on invalid values)."""
        layer = self.slide_layer
        return TilingConfig(
            **self.patch_form.values(),
            **self.store_form.values(),
            mpp_override=layer.metadata.get("mpp_override") if layer else None,
            tissue=TissueParams(**self.tissue_form.values()),
        )

    def _checked_config(self):
        """The config and current slide layer, or ``None`` after an error notification."""
        from pydantic import ValidationError

        layer = self.slide_layer
        if layer is None:
            show_error("Open a slide first (Open… or File > Open with napari-protodiff).")
            return None
        info = layer.metadata["slide_info"]
        if info["mpp"] is None:
            show_error(f"{layer.metadata['path']}: {info['mpp_problem']}; set the mpp override (µm/px) first.")
            return None
        try:
            return self.config(), layer
        except (ProtodiffError, ValidationError) as exc:
            show_error(validation_message(exc))
            return None

    # -- preview -------------------------------------------------------------------------
    def preview(self) -> None:
        """Detect tissue and lay the patch grid in the background; then draw both over the slide."""
        if self.busy or (checked := self._checked_config()) is None:
            return
        cfg, layer = checked
        self.preview_label.setText("Detecting tissue…")
        self._set_running(True, cancellable=False)
        self._worker = _jobs.start(
            _jobs.plan_job, SlideFrame.of(layer), cfg,
            returned=lambda out: self._show_preview(layer, out), finished=self._on_finished,
        )

    def _show_preview(self, layer, outcome: _jobs.Outcome) -> None:
        if outcome.error:
            self.preview_label.setText("")
            show_error(outcome.error)
            return
        if all(ly.unique_id != layer.unique_id for ly in self.viewer.layers):
            return  # the slide was closed meanwhile
        from napari.layers import Layer

        mask, grid, layer_data = outcome.value
        existing = self.overlays(layer.metadata["path"])
        for data, kwargs, kind in layer_data:
            old = existing.get(kwargs["metadata"][OVERLAY_KEY])
            if old is None:
                apply_style(self.viewer.add_layer(Layer.create(data, kwargs, kind)))
                continue
            # Update in place: much cheaper than new visuals, and keeps the user's display settings.
            old.metadata = kwargs["metadata"]
            old.data = data
            old.scale, old.translate = kwargs["scale"], kwargs["translate"]
        self.viewer.layers.selection.active = layer
        rows, cols = grid.grid_shape
        self.preview_label.setText(
            f"{grid.n_patches:,} patches of {grid.patch_size} px at {grid.patch_mpp:.3f} µm/px "
            f"(grid {rows} × {cols}, read from level {grid.level}{', resampled' if grid.resampled else ''}); "
            f"tissue covers {mask.tissue_fraction:.0%} of the slide."
        )

    def overlays(self, path: str | None = None) -> dict[str, Any]:
        """The preview layers (``{"tissue": layer, "patches": layer}``) of the slide at ``path``."""
        path = path or (self.slide_layer.metadata["path"] if self.slide_layer else None)
        return {ly.metadata[OVERLAY_KEY]: ly for ly in self.viewer.layers
                if ly.metadata.get(OVERLAY_KEY) and ly.metadata.get("slide_path") == path}

    def _remove_overlays(self, path: str) -> None:
        for ly in self.overlays(path).values():
            self.viewer.layers.remove(ly)

    # -- tiling --------------------------------------------------------------------------
    def _pick_store(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Patch store (a folder)", self.store_edit.text() or "patches.zarr",
                                              "Zarr store (*.zarr)", options=QFileDialog.Option.DontConfirmOverwrite)
        if path:
            self.store_edit.setText(path if path.endswith(".zarr") else path + ".zarr")

    def tile(self) -> None:
        """Tile the current slide into the store in the background, with progress and cancel."""
        from ..core.progress import CancelToken

        if self.busy or (checked := self._checked_config()) is None:
            return
        cfg, layer = checked
        store = self.store_edit.text().strip()
        if not store:
            show_error("Choose where to write the patch store (a folder such as patches.zarr).")
            return
        from napari.utils import progress

        self._token = CancelToken()
        self._pbar = progress(total=0, desc=f"Tiling {layer.name}")
        self.status_label.setText("Planning…")
        self._set_running(True, cancellable=True)
        self._worker = _jobs.start(
            _jobs.tile_job, [layer.metadata["path"]], os.path.expanduser(store), cfg, self._token,
            yielded=self._on_progress, returned=self._on_tiled, finished=self._on_finished,
        )

    def cancel(self) -> None:
        """Ask the running tiling job to stop after the block it is writing (it can resume later)."""
        if self._token is not None:
            self._token.cancel()
            self.cancel_button.setEnabled(False)
            self.status_label.setText("Cancelling after the current block…")

    def _on_progress(self, ev) -> None:
        if ev.total > 0:
            self.progress_bar.setRange(0, ev.total)
            self.progress_bar.setValue(ev.step)
        else:
            self.progress_bar.setRange(0, 0)  # busy indicator while planning
        rate = ev.metrics.get("patches_per_second")
        self.status_label.setText(ev.message + (f" ({rate:.0f} patches/s)" if rate else ""))
        pbar = self._pbar  # local: napari's progress widgets may process events (and finish the job) re-entrantly
        if pbar is not None:
            if ev.total and pbar.total != ev.total:
                pbar.total = ev.total
            pbar.set_description(ev.message[:60])
            if ev.step > pbar.n:
                pbar.update(ev.step - pbar.n)

    def _on_tiled(self, outcome: _jobs.Outcome) -> None:
        if outcome.cancelled:
            msg = "Tiling cancelled; finished blocks are kept, and tiling again resumes the slide."
            self.status_label.setText(msg)
            show_info(msg)
            return
        if outcome.error:
            self.status_label.setText(outcome.error)
            show_error(outcome.error)
            return
        r = self.last_result = outcome.value
        skipped = [s["slide_id"] for s in r.slides if s["action"] == "skip"]
        msg = (f"Wrote {r.patches_written:,} patches in {r.seconds:.1f} s ({r.patches_per_second:.0f} patches/s) "
               f"to {r.store}")
        if skipped:
            msg += f"; already complete there: {', '.join(skipped)}"
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(1)
        self.status_label.setText(msg + ".")
        show_info(msg + ".")

    # -- job state ---------------------------------------------------------------------------
    def _set_running(self, running: bool, cancellable: bool = False) -> None:
        for w in (self.preview_button, self.tile_button, self.open_button, self.slide_combo, self.mpp_override):
            w.setEnabled(not running)
        self.cancel_button.setEnabled(running and cancellable)
        if running and cancellable:
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
