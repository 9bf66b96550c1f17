"""The Jobs widget's results panel: a finished run's results table, its plots, and attention overlays.

- :func:`results_table` reads a run's results as (headers, rows) for any kind of run:
  ``evaluate-mil`` (metric, value, 95% CI), ``evaluate-probe`` (probe, metric, ...),
  ``study`` (the paper-shaped table: encoder, task, metric, value, CI, verdict against
  the reference) and ``pretrain`` (its summary).
- :func:`run_plots` lists the run's PNG plots (ROC, Kaplan-Meier, metric bars, data size).
- :class:`ResultsPanel` shows both; a plot can be added to the viewer as an RGB image
  layer; "Overlay attention" draws a slide's ABMIL attention over the matching slide
  layer (:mod:`.attention_layer`), opening the slide with this plugin's reader if needed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from napari.utils.notifications import show_error
from qtpy.QtCore import Qt, QUrl
from qtpy.QtGui import QDesktopServices, QPixmap
from qtpy.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QPushButton,
    QSizePolicy,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from ..core.jobs import RunDir


def _num(v) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{v:.3f}" if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)


def _ci(d: dict) -> str:
    lo, hi = d.get("low"), d.get("high")
    return "" if lo is None or hi is None else f"[{_num(lo)}, {_num(hi)}]"


def results_table(run: str | Path) -> tuple[list[str], list[list[str]]]:
    """(headers, rows) of a finished run's results; ([], []) when it has none (yet)."""
    rd = RunDir(run)
    out = rd.outputs
    kind = rd.kind
    try:
        if kind == "study" and (out / "table.json").is_file():
            rows = json.loads((out / "table.json").read_text())
            table = []
            for r in rows:
                v = r.get("vs_reference") or {}
                verdict = v.get("verdict") or ""
                if verdict and v.get("p_value") is not None:
                    verdict += f" (p={v['p_value']:.3g})"
                table.append([r["encoder"] + (" ★" if r.get("best") else ""), r["task"], r["metric"],
                              _num(r.get("value")), _ci(r), verdict])
            return ["encoder", "task", "metric", "value", "95% CI", "vs reference"], table
        if not (out / "results.json").is_file() and not (out / "summary.json").is_file():
            return [], []
        if kind == "evaluate-mil":
            d = json.loads((out / "results.json").read_text())
            rows = [[m, _num(ci.get("value")), _ci(ci)] for m, ci in d.get("metrics", {}).items()]
            if d.get("logrank"):
                rows.append(["log-rank p (risk halves)", _num(d["logrank"].get("p_value")), ""])
            return ["metric", "value", "95% CI"], rows
        if kind == "evaluate-probe":
            d = json.loads((out / "results.json").read_text())
            return ["probe", "metric", "value", "95% CI"], [
                [p, m, _num(ci.get("value")), _ci(ci)] for p, ms in d.get("metrics", {}).items() for m, ci in ms.items()]
        if (out / "summary.json").is_file():
            d = json.loads((out / "summary.json").read_text())
            return ["item", "value"], [[k, _num(v)] for k, v in d.items() if not isinstance(v, (dict, list))]
    except (OSError, ValueError, KeyError):
        return [], []
    return [], []


def run_plots(run: str | Path) -> list[Path]:
    """The PNG plots in a run's outputs (and outputs/plots/), sorted."""
    out = RunDir(run).outputs
    return sorted(out.glob("*.png")) + sorted((out / "plots").glob("*.png"))


def attention_slides(run: str | Path) -> list[str]:
    """Slide ids with an attention map in an evaluate-mil run ([] when it has none)."""
    p = RunDir(run).outputs / "attention.zarr" / "zarr.json"
    try:
        return list(json.loads(p.read_text())["attributes"]["protodiff"]["slides"])
    except (OSError, ValueError, KeyError, TypeError):
        return []


def layer_source(layer) -> str | None:
    """The file a layer was opened from (napari's source, or this plugin's metadata), or None."""
    src = getattr(getattr(layer, "source", None), "path", None) or layer.metadata.get("path")
    return str(src) if src else None


class ResultsPanel(QWidget):
    """Results table, plot preview and attention overlay of one run."""

    def __init__(self, viewer=None, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = viewer
        self.run_dir: Path | None = None
        root = QVBoxLayout(self)
        root.setContentsMargins(0, 0, 0, 0)
        self.table = QTableWidget(0, 0)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.verticalHeader().setVisible(False)
        root.addWidget(self.table)
        row = QHBoxLayout()
        self.plot_combo = QComboBox()
        self.plot_combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.plot_combo.currentIndexChanged.connect(self._show_plot)
        self.layer_button = QPushButton("Add as layer")
        self.layer_button.setToolTip("Add the plot to the viewer as an RGB image layer")
        self.layer_button.clicked.connect(lambda: self.add_plot_layer())
        self.report_button = QPushButton("Open report")
        self.report_button.setToolTip("Open report.md (a study) or the outputs folder")
        self.report_button.clicked.connect(lambda: self.open_report())
        row.addWidget(QLabel("Plot"))
        row.addWidget(self.plot_combo, 1)
        row.addWidget(self.layer_button)
        row.addWidget(self.report_button)
        root.addLayout(row)
        self.preview = QLabel("plots of a finished evaluation appear here")
        self.preview.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.preview.setMinimumHeight(200)
        self.preview.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Ignored)
        root.addWidget(self.preview, 1)
        row = QHBoxLayout()
        self.slide_combo = QComboBox()
        self.slide_combo.setToolTip("Slides with an attention map in this run")
        self.attention_button = QPushButton("Overlay attention")
        self.attention_button.setToolTip("Draw the slide's ABMIL attention over its layer (opened if needed)")
        self.attention_button.clicked.connect(lambda: self.overlay_attention())
        row.addWidget(QLabel("Slide"))
        row.addWidget(self.slide_combo, 1)
        row.addWidget(self.attention_button)
        root.addLayout(row)
        self.show_run(None)

    # -- contents ------------------------------------------------------------------------------------
    def show_run(self, run: str | Path | None) -> None:
        """Fill the panel from ``run`` (None: empty)."""
        self.run_dir = None if run is None else Path(run)
        headers, rows = results_table(run) if run is not None else ([], [])
        self.table.clear()
        self.table.setColumnCount(len(headers))
        self.table.setRowCount(len(rows))
        self.table.setHorizontalHeaderLabels(headers)
        for i, r in enumerate(rows):
            for j, v in enumerate(r):
                self.table.setItem(i, j, QTableWidgetItem(v))
        hh = self.table.horizontalHeader()
        for j in range(len(headers)):
            hh.setSectionResizeMode(j, QHeaderView.ResizeMode.ResizeToContents)
        if headers:
            hh.setSectionResizeMode(len(headers) - 1, QHeaderView.ResizeMode.Stretch)
        # as tall as its rows (up to ten), so the plot gets the rest
        vh = self.table.verticalHeader()
        shown = min(max(len(rows), 3), 10)
        self.table.setMaximumHeight(hh.sizeHint().height() + shown * vh.defaultSectionSize() + 4)
        self.plots = run_plots(run) if run is not None else []
        self.plot_combo.blockSignals(True)
        self.plot_combo.clear()
        self.plot_combo.addItems([str(p.relative_to(self.run_dir / "outputs")) for p in self.plots])
        self.plot_combo.blockSignals(False)
        self._show_plot()
        slides = attention_slides(run) if run is not None else []
        self.slide_combo.clear()
        self.slide_combo.addItems(slides)
        self.layer_button.setEnabled(bool(self.plots) and self.viewer is not None)
        self.report_button.setEnabled(run is not None and (self.run_dir / "outputs").is_dir())
        self.attention_button.setEnabled(bool(slides) and self.viewer is not None)
        self.slide_combo.setEnabled(bool(slides))

    @property
    def n_rows(self) -> int:
        return self.table.rowCount()

    def cell(self, row: int, col: int) -> str:
        item = self.table.item(row, col)
        return "" if item is None else item.text()

    def _show_plot(self, *_) -> None:
        i = self.plot_combo.currentIndex()
        if 0 <= i < len(self.plots):
            pm = QPixmap(str(self.plots[i]))
            self._pixmap = pm
            self._fit_preview()
        else:
            self._pixmap = None
            self.preview.setPixmap(QPixmap())
            self.preview.setText("plots of a finished evaluation appear here")

    def _fit_preview(self) -> None:
        pm = getattr(self, "_pixmap", None)
        if pm is not None and not pm.isNull():
            w, h = max(50, self.preview.width()), max(50, self.preview.height())
            self.preview.setPixmap(pm.scaled(w, h, Qt.AspectRatioMode.KeepAspectRatio,
                                             Qt.TransformationMode.SmoothTransformation))

    def resizeEvent(self, event) -> None:  # noqa: N802 (Qt)
        super().resizeEvent(event)
        self._fit_preview()

    # -- actions -------------------------------------------------------------------------------------
    def add_plot_layer(self, index: int | None = None):
        """Add a plot (the one shown by default) to the viewer as an RGB image layer; returns it."""
        i = self.plot_combo.currentIndex() if index is None else index
        if self.viewer is None or not 0 <= i < len(self.plots):
            return None
        import numpy as np
        from PIL import Image

        p = self.plots[i]
        with Image.open(p) as im:
            rgb = np.asarray(im.convert("RGB"))
        return self.viewer.add_image(rgb, rgb=True, name=f"{self.run_dir.name}: {p.stem}",
                                     metadata={"path": str(p), "run": str(self.run_dir)})

    def open_report(self) -> Path | None:
        """Open the run's report.md if it has one, else its outputs folder; returns what was opened."""
        if self.run_dir is None:
            return None
        out = self.run_dir / "outputs"
        target = out / "report.md" if (out / "report.md").is_file() else out
        QDesktopServices.openUrl(QUrl.fromLocalFile(str(target)))
        return target

    def overlay_attention(self, slide: str | None = None):
        """Overlay ``slide``'s (default: the chosen slide's) attention map on its layer; returns the new layer."""
        from ..core.errors import ProtodiffError
        from .attention_layer import attention_layer_data

        slide = slide or self.slide_combo.currentText()
        if self.viewer is None or self.run_dir is None or not slide:
            show_error("Choose an evaluation run with attention maps first.")
            return None
        try:
            from ..core.evaluation.attention import read_attention

            m = read_attention(self.run_dir, slide=slide)[0]
            layer = self._slide_layer(m.slide_id, m.attrs.get("slide_path"), m.attrs.get("slide_mpp"))
            data, kwargs, _ = attention_layer_data(self.run_dir, m.slide_id, layer)
        except ProtodiffError as exc:
            show_error(str(exc))
            return None
        return self.viewer.add_image(data, **kwargs)

    def _slide_layer(self, slide_id: str, path: str | None, mpp: float | None = None):
        """The open layer of the slide (by file), else the slide opened with this plugin's reader at the pixel
        size it was tiled at (``mpp``: a slide without one in its metadata was tiled with an override)."""
        from ..core.errors import ProtodiffError
        from ..core.store import slide_id_from_path
        from .reader import SLIDE_KEY, slide_layer_data

        for ly in self.viewer.layers:
            src = layer_source(ly)
            if src and ly.metadata.get(SLIDE_KEY, True) and (
                    (path and Path(src).name == Path(path).name) or slide_id_from_path(src) == slide_id):
                return ly
        if not path or not Path(path).exists():
            raise ProtodiffError(f"Slide '{slide_id}' has no slide file to draw its attention on "
                                 f"({path or 'a virtual slide'}); open it in napari first.")
        data, kwargs, _ = slide_layer_data(path, mpp_override=mpp)
        if kwargs["metadata"].get("units_warning"):
            from napari.utils.notifications import show_warning

            show_warning(kwargs["metadata"]["units_warning"])
        return self.viewer.add_image(data, **kwargs)
