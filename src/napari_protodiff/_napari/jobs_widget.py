"""The Jobs dock widget: start, list, watch, cancel and resume protodiff jobs; open their results.

Every job — DINO pretraining, a probe or ABMIL evaluation, a data-efficiency study —
runs as a subprocess running the ``protodiff`` command itself with the form's
arguments (:mod:`._subprocess_job`), so no computation shares the viewer's process or
its GIL. A :class:`QTimer` polls the run directory (``status.json`` and the new lines of
``metrics.jsonl``; see :mod:`napari_protodiff.core.jobs`) for the progress bar, the
message and the live loss plot, and lists every run under the runs folder (any kind,
also ones started from a terminal) with state, progress and last metrics. **Cancel**
sends SIGTERM to the job's process group: pretraining stops after its current step and
saves a checkpoint, an evaluation or study stops at once; either ends ``cancelled``.
**Resume** runs the command again with ``--resume``. A finished run's results table,
plots and attention maps open in the Results tab (:mod:`.jobs_results`). No torch is
imported here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import QPointF, QRectF, Qt, QTimer, QUrl
from qtpy.QtGui import QColor, QDesktopServices, QPainter, QPen, QPolygonF
from qtpy.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QPushButton,
    QStackedWidget,
    QTableWidget,
    QTableWidgetItem,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from ..core.jobs import RunDir, find_runs
from ._subprocess_job import MetricsTail, SubprocessJob, last_line
from .jobs_forms import FORMS, command_of, path_row, pick_dir
from .jobs_results import ResultsPanel
from ._form import progress_and_status

POLL_MS = 500
RUNS_EVERY = 4  # polls between two updates of the runs list (the folder itself is scanned at job start and end)
ENDED = ("finished", "failed", "cancelled", "interrupted")
RESUMABLE = ("cancelled", "failed", "interrupted")


class LossPlot(QWidget):
    """A light line plot of (step, loss) drawn with QPainter (no plotting library)."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.steps: list[float] = []
        self.values: list[float] = []
        self.setMinimumHeight(120)
        self.setToolTip("DINO loss per step")

    def set_data(self, steps: list[float], values: list[float]) -> None:
        self.steps, self.values = list(steps), list(values)
        self.update()

    def append(self, step: float, value: float) -> None:
        self.steps.append(step)
        self.values.append(value)
        self.update()

    def paintEvent(self, event) -> None:  # noqa: N802 (Qt)
        p = QPainter(self)
        p.setRenderHint(QPainter.RenderHint.Antialiasing)
        r = QRectF(self.rect()).adjusted(44, 8, -8, -20)
        fg = self.palette().color(self.foregroundRole())
        p.setPen(QPen(fg, 1))
        p.drawRect(r)
        if len(self.values) < 1:
            p.drawText(r, Qt.AlignmentFlag.AlignCenter, "loss appears here while a job runs")
            return
        x0, x1 = min(self.steps), max(self.steps)
        y0, y1 = min(self.values), max(self.values)
        if x1 == x0:
            x1 = x0 + 1
        if y1 == y0:
            y0, y1 = y0 - 0.5, y1 + 0.5
        pts = QPolygonF([QPointF(r.left() + (s - x0) / (x1 - x0) * r.width(),
                                 r.bottom() - (v - y0) / (y1 - y0) * r.height())
                         for s, v in zip(self.steps, self.values)])
        p.setPen(QPen(QColor("#4fa3ff"), 1.5))
        p.drawPolyline(pts)
        p.setPen(QPen(fg, 1))
        p.drawText(QRectF(0, r.top() - 6, 42, 14), Qt.AlignmentFlag.AlignRight, f"{y1:.3g}")
        p.drawText(QRectF(0, r.bottom() - 8, 42, 14), Qt.AlignmentFlag.AlignRight, f"{y0:.3g}")
        p.drawText(QRectF(r.left(), r.bottom() + 2, r.width(), 16), Qt.AlignmentFlag.AlignLeft, f"step {x0:.0f}")
        p.drawText(QRectF(r.left(), r.bottom() + 2, r.width(), 16), Qt.AlignmentFlag.AlignRight, f"{x1:.0f}")


def _metrics_text(m: dict | None) -> str:
    if not isinstance(m, dict) or not m:
        return ""
    keys = [k for k in ("loss", "auc", "c_index", "balanced_accuracy") if k in m] or [k for k in m if k != "step"][:2]
    return ", ".join(f"{k} {m[k]:.4g}" if isinstance(m[k], (int, float)) else f"{k} {m[k]}" for k in keys)


def run_row(rd: RunDir) -> list[str]:
    """Name, kind, state, progress and last metrics (or message) of a run, read cheaply (for the runs list)."""
    try:
        st, state = rd.status, rd.state
        kind = rd.kind or "?"
    except Exception:  # noqa: BLE001 - a file being replaced: shown next time
        return [rd.path.name, "?", "?", "", ""]
    step, total = st.get("step"), st.get("total")
    progress = f"{step}/{total}" if total else ""
    last = last_line(rd.metrics_path)
    try:
        info = _metrics_text(json.loads(last)) if last else ""
    except ValueError:
        info = ""
    if state == "finished" and isinstance(st.get("metrics"), dict):  # an evaluation's headline metrics
        info = ", ".join(f"{k} {v.get('value'):.3f}" for k, v in list(st["metrics"].items())[:2]
                         if isinstance(v, dict) and isinstance(v.get("value"), (int, float)))
    return [rd.path.name, kind, state, progress, st.get("error") or info or st.get("message") or ""]


class JobsWidget(QWidget):
    """Start, list, watch, cancel and resume jobs running in subprocesses; open their results."""

    def __init__(self, napari_viewer=None) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.run_dir: Path | None = None
        self.last_args: list[str] | None = None
        self.job = SubprocessJob(self)
        self.job.ended.connect(self._on_ended)
        self._metrics = MetricsTail()
        self._ticks = 0
        self._build()
        self.timer = QTimer(self)
        self.timer.setInterval(POLL_MS)
        self.timer.timeout.connect(self.poll)

    # -- layout --------------------------------------------------------------------------------
    def _build(self) -> None:
        root = QVBoxLayout(self)
        box = QGroupBox("New job")
        lay = QVBoxLayout(box)
        self.kind_combo = QComboBox()
        self.forms = [cls() for cls in FORMS]
        self.stack = QStackedWidget()
        for f in self.forms:
            self.kind_combo.addItem(f.title)
            self.stack.addWidget(f)
        self.kind_combo.currentIndexChanged.connect(self._on_kind)
        self._on_kind(0)
        lay.addWidget(self.kind_combo)
        lay.addWidget(self.stack)
        form = QFormLayout()
        form.setContentsMargins(0, 0, 0, 0)
        self.run_edit, row = path_row("run directory (created)", self._pick_run)
        form.addRow("Run directory", row)
        lay.addLayout(form)
        root.addWidget(box)

        row = QHBoxLayout()
        self.start_button = QPushButton("Start")
        self.start_button.clicked.connect(lambda: self.start())
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.clicked.connect(self.cancel)
        self.resume_button = QPushButton("Resume")
        self.resume_button.clicked.connect(self.resume)
        self.watch_button = QPushButton("Watch…")
        self.watch_button.setToolTip("Follow an existing run directory (e.g. started from a terminal)")
        self.watch_button.clicked.connect(self._pick_watch)
        self.open_button = QPushButton("Open outputs")
        self.open_button.clicked.connect(self.open_outputs)
        for b in (self.start_button, self.cancel_button, self.resume_button, self.watch_button, self.open_button):
            row.addWidget(b)
        root.addLayout(row)
        self.progress_bar, self.status_label = progress_and_status(root)

        self.tabs = QTabWidget()
        runs = QWidget()
        lay = QVBoxLayout(runs)
        form = QFormLayout()
        form.setContentsMargins(0, 0, 0, 0)
        self.runs_edit, row = path_row("folder holding run directories", self._pick_runs_root)
        self.runs_edit.editingFinished.connect(self.refresh_runs)
        form.addRow("Runs folder", row)
        lay.addLayout(form)
        self.runs_table = QTableWidget(0, 5)
        self.runs_table.setHorizontalHeaderLabels(["run", "kind", "state", "progress", "last metrics / message"])
        self.runs_table.verticalHeader().setVisible(False)
        self.runs_table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.runs_table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.runs_table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        hh = self.runs_table.horizontalHeader()
        for j in range(4):
            hh.setSectionResizeMode(j, QHeaderView.ResizeMode.ResizeToContents)
        hh.setSectionResizeMode(4, QHeaderView.ResizeMode.Stretch)
        self.runs_table.cellClicked.connect(lambda r, _c: self._on_run_clicked(r))
        lay.addWidget(self.runs_table)
        self._run_paths: list[Path] = []
        self.tabs.addTab(runs, "Runs")
        self.plot = LossPlot()
        self.tabs.addTab(self.plot, "Loss")
        self.results = ResultsPanel(self.viewer)
        self.tabs.addTab(self.results, "Results")
        root.addWidget(self.tabs, 1)
        self._update_buttons()

    def _pick_run(self, edit) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Run directory (a folder)", edit.text() or "run", "",
                                              options=QFileDialog.Option.DontConfirmOverwrite)
        if path:
            edit.setText(path)

    def _pick_runs_root(self, edit) -> None:
        pick_dir("Folder holding run directories")(edit)
        self.refresh_runs()

    def _pick_watch(self) -> None:
        if p := QFileDialog.getExistingDirectory(self, "Run directory to watch", ""):
            self.watch(p)

    def _on_kind(self, i: int) -> None:
        from qtpy.QtWidgets import QSizePolicy

        for k, f in enumerate(self.forms):  # the stack as tall as the shown form, not the tallest
            p = QSizePolicy.Policy.Preferred if k == i else QSizePolicy.Policy.Ignored
            f.setSizePolicy(p, p)
        self.stack.setCurrentIndex(i)
        self.stack.adjustSize()

    def form_for(self, kind: str):
        """The form of a job kind (``pretrain``, ``evaluate-probe``, ``evaluate-mil``, ``study``); shows it."""
        i = next(k for k, f in enumerate(self.forms) if f.kind == kind)
        self.kind_combo.setCurrentIndex(i)
        return self.forms[i]

    # -- state ---------------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        """Whether a job started by this widget is running."""
        return self.job.busy

    @property
    def process(self):
        """The running job's QProcess (None when idle)."""
        return self.job.process

    def _state(self) -> str | None:
        try:
            return RunDir(self.run_dir).state if self.run_dir and RunDir.is_run_dir(self.run_dir) else None
        except Exception:  # noqa: BLE001 - a file being replaced
            return None

    def _update_buttons(self) -> None:
        busy = self.busy
        self.start_button.setEnabled(not busy)
        self.cancel_button.setEnabled(busy)
        self.resume_button.setEnabled(not busy and self._state() in RESUMABLE and self.last_args is not None)
        self.open_button.setEnabled(self.run_dir is not None)

    # -- commands ------------------------------------------------------------------------------
    def command(self) -> list[str]:
        """The ``protodiff`` arguments of the shown form (raises ValueError with one sentence on a bad form)."""
        run = self.run_edit.text().strip()
        form = self.stack.currentWidget()
        args = form.args(os.path.expanduser(run) if run else "")
        if not run:
            raise ValueError("Choose a run directory for the job.")
        return args

    def start(self, args: list[str] | None = None) -> bool:
        """Start ``protodiff ARGS`` (default: the shown form's job) as a subprocess; False after a notification."""
        if self.busy:
            return False
        if args is None:
            try:
                args = self.command()
            except ValueError as exc:
                show_error(str(exc))
                return False
        run = Path(args[args.index("-o") + 1])
        self.last_args = [a for a in args if a != "--resume"]
        if not self.runs_edit.text().strip():
            self.runs_edit.setText(str(run.parent))
        self._launch(args, run)
        return True

    def resume(self) -> bool:
        """Run the current run's command again with ``--resume``."""
        if self.busy or self.last_args is None or self.run_dir is None:
            return False
        self._launch([*self.last_args, "--resume"], self.run_dir)
        return True

    def _launch(self, args: list[str], run: Path) -> None:
        self._follow(run)
        self.progress_bar.setRange(0, 0)
        self.status_label.setText("Starting…")
        self.job.start(args)
        self.refresh_runs()
        self.timer.start()
        self.tabs.setCurrentWidget(self.plot if args[0] == "pretrain" else self.tabs.widget(0))
        self._update_buttons()

    def _follow(self, run: Path) -> None:
        self.run_dir = Path(run)
        self._metrics.reset(self.run_dir / "metrics.jsonl")
        self.plot.set_data([], [])
        self.results.show_run(None)

    def cancel(self) -> None:
        """SIGTERM to the job's process group; it ends ``cancelled`` (pretraining after its current step)."""
        if self.job.cancel():
            self.status_label.setText("Cancelling…")
            self.cancel_button.setEnabled(False)

    def watch(self, run_dir: str | os.PathLike) -> None:
        """Follow a run directory (progress, loss, results when finished) without a process of this widget."""
        if not RunDir.is_run_dir(run_dir):
            show_error(f"{run_dir}: not a protodiff run directory (no run.json).")
            return
        if self.busy and Path(run_dir) != self.run_dir:
            show_error("A job started here is running; cancel it or wait before following another run.")
            return
        self._follow(Path(run_dir))
        try:
            self.last_args = command_of(RunDir(self.run_dir).manifest.get("argv", []))
        except Exception:  # noqa: BLE001 - an unreadable manifest: no resume
            self.last_args = None
        self.poll()
        if self._state() in ENDED:
            self.show_results()
        self.timer.start()
        self._update_buttons()

    def open_outputs(self) -> Path | None:
        """Open the run's outputs folder in the file browser; returns it."""
        if self.run_dir is None:
            return None
        out = self.run_dir / "outputs"
        target = out if out.is_dir() else self.run_dir
        QDesktopServices.openUrl(QUrl.fromLocalFile(str(target)))
        return target

    def show_results(self) -> int:
        """Fill the Results tab from the current run and show it; returns the number of table rows."""
        self.results.show_run(self.run_dir)
        if self.results.n_rows or self.results.plots:
            self.tabs.setCurrentWidget(self.results)
        return self.results.n_rows

    # -- runs list -----------------------------------------------------------------------------
    def refresh_runs(self, scan: bool = True) -> None:
        """List the run directories under the runs folder (3 levels deep) and the current run; ``scan=False``
        only re-reads the runs already listed (what the poll does between two scans)."""
        if scan:
            root = self.runs_edit.text().strip()
            paths = [r.path for r in find_runs(os.path.expanduser(root))] if root else []
        else:
            paths = [p for p in self._run_paths if RunDir.is_run_dir(p)]
        if self.run_dir is not None and RunDir.is_run_dir(self.run_dir) and \
                all(p.resolve() != self.run_dir.resolve() for p in paths):
            paths.insert(0, self.run_dir)
        self._run_paths = paths
        t = self.runs_table
        t.setRowCount(len(paths))
        for i, p in enumerate(paths):
            for j, v in enumerate(run_row(RunDir(p))):
                item = t.item(i, j)
                if item is None:
                    t.setItem(i, j, QTableWidgetItem(v))
                elif item.text() != v:
                    item.setText(v)
            if self.run_dir is not None and p == self.run_dir:
                t.selectRow(i)

    def run_rows(self) -> list[list[str]]:
        """The runs list as text (for tests and scripts)."""
        t = self.runs_table
        return [[t.item(i, j).text() if t.item(i, j) else "" for j in range(t.columnCount())] for i in range(t.rowCount())]

    def _on_run_clicked(self, row: int) -> None:
        if 0 <= row < len(self._run_paths) and self._run_paths[row] != self.run_dir:
            self.watch(self._run_paths[row])

    # -- polling -------------------------------------------------------------------------------
    def poll(self) -> None:
        """Read status.json and new metrics lines; update the bar, the message, the plot and the runs list."""
        self._ticks += 1
        if self._ticks % RUNS_EVERY == 1:
            self.refresh_runs(scan=False)
        if self.run_dir is None or not RunDir.is_run_dir(self.run_dir):
            return
        rd = RunDir(self.run_dir)
        try:
            st = rd.status
            state = rd.state
        except Exception:  # noqa: BLE001 - a file being replaced: next tick
            return
        records, restarted = self._metrics.read()
        if restarted:
            self.plot.set_data([], [])
        losses = [(m.get("step", len(self.plot.steps)), m["loss"]) for m in records if "loss" in m]
        if losses:
            self.plot.steps += [s for s, _ in losses]
            self.plot.values += [v for _, v in losses]
            self.plot.update()
        total, step = st.get("total") or 0, st.get("step") or 0
        if total:
            self.progress_bar.setRange(0, int(total))
            self.progress_bar.setValue(min(int(step), int(total)))
        msg = st.get("error") or st.get("message") or ""
        self.status_label.setText(f"{state}: {msg}" if msg and msg != state else state)
        if not self.busy and state in ENDED:
            self.timer.stop()  # a watched run that ended
            self.refresh_runs()
        self._update_buttons()

    def _on_ended(self, code: int, error: str) -> None:
        self.timer.stop()
        self.poll()
        self.refresh_runs()
        state = self._state()
        kind = RunDir(self.run_dir).kind if state else None
        if code == 0 and state == "finished":
            self.progress_bar.setRange(0, 1)
            self.progress_bar.setValue(1)
            if kind == "pretrain":
                msg = f"Pretraining finished; encoder in {self.run_dir / 'outputs' / 'encoder'}."
            else:
                msg = f"{'Study' if kind == 'study' else 'Evaluation'} finished; results in {self.run_dir / 'outputs'}."
            self.status_label.setText(msg)
            show_info(msg)
            self.show_results()
        elif state == "cancelled" or code == 130:
            msg = "Job cancelled; Resume continues it" + (" from its last checkpoint." if kind == "pretrain" else ".")
            self.status_label.setText(msg)
            show_info(msg)
        else:
            msg = error or f"the job exited with code {code}"
            self.status_label.setText(msg)
            show_error(msg)
        self._update_buttons()
