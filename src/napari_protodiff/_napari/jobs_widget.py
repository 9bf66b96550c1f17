"""The Jobs dock widget: run pretraining as a subprocess, watch it, cancel, resume, open its outputs.

The job runs as ``python -m napari_protodiff.cli pretrain ...`` — the same command as
the CLI — in a :class:`QProcess`, so training never shares the viewer's process (or
its GIL). A :class:`QTimer` polls the run directory (``status.json`` and the new lines
of ``metrics.jsonl``; see :mod:`napari_protodiff.core.jobs`) for the progress bar and
the live loss plot. Cancel sends SIGTERM: the job stops after the current step, saves
a checkpoint and marks itself ``cancelled``; Resume runs the command again with
``--resume``. "Watch…" follows any run directory, e.g. one started from a terminal.
No torch is imported here.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import QPointF, QProcess, QRectF, Qt, QTimer, QUrl
from qtpy.QtGui import QColor, QDesktopServices, QPainter, QPen, QPolygonF
from qtpy.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ..core.jobs import RunDir
from ..core.ssl.config import PRESETS, PretrainConfig

POLL_MS = 500
TERMINATE_GRACE_MS = 60_000


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


def _path_list(text: str) -> list[str]:
    return [s.strip() for s in text.split(";") if s.strip()]


class JobsWidget(QWidget):
    """Start, watch, cancel and resume long jobs (DINO pretraining) running in a subprocess."""

    def __init__(self, napari_viewer=None) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.process: QProcess | None = None
        self.run_dir: Path | None = None
        self.last_args: list[str] | None = None
        self._metrics_pos = 0
        self._stderr = b""
        self._build()
        self.timer = QTimer(self)
        self.timer.setInterval(POLL_MS)
        self.timer.timeout.connect(self.poll)

    # -- layout --------------------------------------------------------------------------------
    def _build(self) -> None:
        root = QVBoxLayout(self)
        box = QGroupBox("DINO pretraining")
        form = QFormLayout(box)
        self.real_edit, real_row = self._path_row("real patch store(s), ';'-separated", self._pick_real)
        form.addRow("Real stores", real_row)
        self.synth_edit, synth_row = self._path_row("synthetic patch store(s), ';'-separated (optional)",
                                                    self._pick_synth)
        form.addRow("Synthetic stores", synth_row)
        self.fraction = QDoubleSpinBox()
        self.fraction.setRange(0.0, 1.0)
        self.fraction.setDecimals(2)
        self.fraction.setSingleStep(0.05)
        self.fraction.setValue(1.0)
        self.fraction.setToolTip(PretrainConfig.model_fields["real_fraction"].description)
        form.addRow("Real fraction", self.fraction)
        self.preset = QComboBox()
        self.preset.addItems(list(PRESETS))
        self.preset.setToolTip(PretrainConfig.model_fields["preset"].description)
        form.addRow("Preset", self.preset)
        self.arch = QComboBox()
        self.arch.addItems(["vit_tiny", "vit_small", "vit_base"])
        form.addRow("Architecture", self.arch)
        self.epochs = QSpinBox()
        self.epochs.setRange(0, 100000)
        self.epochs.setSpecialValueText("preset")
        form.addRow("Epochs", self.epochs)
        self.batch = QSpinBox()
        self.batch.setRange(0, 65536)
        self.batch.setSpecialValueText("preset")
        form.addRow("Batch size", self.batch)
        self.images = QSpinBox()
        self.images.setRange(0, 10**9)
        self.images.setSpecialValueText("preset")
        form.addRow("Images per epoch", self.images)
        self.workers = QSpinBox()
        self.workers.setRange(0, 64)
        self.workers.setValue(min(2, os.cpu_count() or 1))
        form.addRow("Loader workers", self.workers)
        self.run_edit, run_row = self._path_row("run directory (created)", self._pick_run)
        form.addRow("Run directory", run_row)
        root.addWidget(box)

        row = QHBoxLayout()
        self.start_button = QPushButton("Start")
        self.start_button.clicked.connect(self.start)
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
        self.progress_bar = QProgressBar()
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(0)
        root.addWidget(self.progress_bar)
        self.status_label = QLabel("")
        self.status_label.setWordWrap(True)
        self.status_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        root.addWidget(self.status_label)
        self.plot = LossPlot()
        root.addWidget(self.plot)
        root.addStretch(1)
        self._update_buttons()

    def _path_row(self, placeholder: str, pick) -> tuple[QLineEdit, QWidget]:
        w = QWidget()
        lay = QHBoxLayout(w)
        lay.setContentsMargins(0, 0, 0, 0)
        edit = QLineEdit()
        edit.setPlaceholderText(placeholder)
        b = QPushButton("…")
        b.setMaximumWidth(32)
        b.clicked.connect(pick)
        lay.addWidget(edit, 1)
        lay.addWidget(b)
        return edit, w

    def _pick_dir(self, title: str) -> str:
        return QFileDialog.getExistingDirectory(self, title, "")

    def _pick_real(self) -> None:
        if p := self._pick_dir("Real patch store"):
            self.real_edit.setText(";".join(_path_list(self.real_edit.text()) + [p]))

    def _pick_synth(self) -> None:
        if p := self._pick_dir("Synthetic patch store"):
            self.synth_edit.setText(";".join(_path_list(self.synth_edit.text()) + [p]))

    def _pick_run(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Run directory (a folder)", self.run_edit.text() or "pretrain-run",
                                              "", options=QFileDialog.Option.DontConfirmOverwrite)
        if path:
            self.run_edit.setText(path)

    def _pick_watch(self) -> None:
        if p := self._pick_dir("Run directory to watch"):
            self.watch(p)

    # -- state ---------------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        """Whether a job started by this widget is running."""
        return self.process is not None and self.process.state() != QProcess.ProcessState.NotRunning

    def _update_buttons(self) -> None:
        busy = self.busy
        self.start_button.setEnabled(not busy)
        self.cancel_button.setEnabled(busy)
        state = RunDir(self.run_dir).state if self.run_dir and RunDir.is_run_dir(self.run_dir) else None
        self.resume_button.setEnabled(not busy and state in ("cancelled", "failed", "interrupted")
                                      and self.last_args is not None)
        self.open_button.setEnabled(self.run_dir is not None)

    # -- commands ------------------------------------------------------------------------------
    def command(self) -> list[str]:
        """The ``protodiff pretrain`` arguments for the form's values (raises ValueError on a bad form)."""
        real, synth = _path_list(self.real_edit.text()), _path_list(self.synth_edit.text())
        run = self.run_edit.text().strip()
        if not real and not synth:
            raise ValueError("Choose at least one patch store (real or synthetic).")
        if not run:
            raise ValueError("Choose a run directory for the job.")
        args = ["pretrain", "-o", os.path.expanduser(run)]
        for p in real:
            args += ["--real", os.path.expanduser(p)]
        for p in synth:
            args += ["--synthetic", os.path.expanduser(p)]
        args += ["--real-fraction", f"{self.fraction.value():g}", "--preset", self.preset.currentText(),
                 "--arch", self.arch.currentText(), "--workers", str(self.workers.value())]
        for flag, box in (("--epochs", self.epochs), ("--batch-size", self.batch), ("--images-per-epoch", self.images)):
            if box.value() > 0:
                args += [flag, str(box.value())]
        return args

    def start(self, args: list[str] | None = None) -> bool:
        """Start ``protodiff ARGS`` (default: the form's pretraining) as a subprocess; False after a notification."""
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
        self._launch(args, run)
        return True

    def resume(self) -> bool:
        """Run the last job's command again with ``--resume``."""
        if self.busy or self.last_args is None:
            return False
        self._launch([*self.last_args, "--resume"], self.run_dir)
        return True

    def _launch(self, args: list[str], run: Path) -> None:
        self.run_dir = run
        self._metrics_pos = 0
        self._stderr = b""
        self.plot.set_data([], [])
        self.progress_bar.setRange(0, 0)
        self.status_label.setText("Starting…")
        proc = QProcess(self)
        proc.setProgram(sys.executable)
        proc.setArguments(["-m", "napari_protodiff.cli", *args, "--quiet"])
        proc.readyReadStandardError.connect(self._read_stderr)
        proc.finished.connect(self._on_finished)
        self.process = proc
        proc.start()
        self.timer.start()
        self._update_buttons()

    def cancel(self) -> None:
        """Ask the job to stop after its current step (SIGTERM); it saves a checkpoint and can be resumed."""
        if not self.busy:
            return
        self.status_label.setText("Cancelling after the current step…")
        proc = self.process
        proc.terminate()
        # Kill only this process if it ignores the request (never a job started later, e.g. a resume).
        QTimer.singleShot(TERMINATE_GRACE_MS, lambda: self._kill_if_running(proc))
        self.cancel_button.setEnabled(False)

    def _kill_if_running(self, proc: QProcess) -> None:
        if proc is self.process and self.busy:
            proc.kill()

    def watch(self, run_dir: str | os.PathLike) -> None:
        """Follow a run directory's progress and loss (no process of this widget)."""
        if not RunDir.is_run_dir(run_dir):
            show_error(f"{run_dir}: not a protodiff run directory (no run.json).")
            return
        self.run_dir = Path(run_dir)
        self._metrics_pos = 0
        self.plot.set_data([], [])
        try:
            args = json.loads((self.run_dir / "manifest.json").read_text()).get("argv", [])
            i = args.index("pretrain")
            self.last_args = [a for a in args[i:] if a not in ("--resume", "--quiet")]
        except (OSError, ValueError):
            self.last_args = None
        self.poll()
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

    # -- polling -------------------------------------------------------------------------------
    def poll(self) -> None:
        """Read status.json and new metrics lines; update the bar, the message and the plot."""
        if self.run_dir is None or not RunDir.is_run_dir(self.run_dir):
            return
        rd = RunDir(self.run_dir)
        try:
            st = rd.status
            state = rd.state
        except Exception:  # a file being replaced: next tick
            return
        self._read_metrics(rd)
        total, step = st.get("total") or 0, st.get("step") or 0
        if total:
            self.progress_bar.setRange(0, int(total))
            self.progress_bar.setValue(int(step))
        msg = st.get("error") or st.get("message") or ""
        self.status_label.setText(f"{state}: {msg}")
        if not self.busy and state in ("finished", "failed", "cancelled", "interrupted") and self.process is None:
            self.timer.stop()  # a watched run that ended
        self._update_buttons()

    def _read_metrics(self, rd: RunDir) -> None:
        try:
            with open(rd.metrics_path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < self._metrics_pos:  # rewritten (a resume truncated it): read again
                    self._metrics_pos = 0
                    self.plot.set_data([], [])
                f.seek(self._metrics_pos)
                chunk = f.read()
        except FileNotFoundError:
            return
        end = chunk.rfind(b"\n") + 1  # only whole lines
        self._metrics_pos += end
        for line in chunk[:end].splitlines():
            try:
                m = json.loads(line)
            except ValueError:
                continue
            if "loss" in m:
                self.plot.steps.append(m.get("step", len(self.plot.steps)))
                self.plot.values.append(m["loss"])
        if end:
            self.plot.update()

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
        state = RunDir(self.run_dir).state if self.run_dir and RunDir.is_run_dir(self.run_dir) else None
        if code == 0 and state == "finished":
            self.progress_bar.setRange(0, 1)
            self.progress_bar.setValue(1)
            msg = f"Pretraining finished; encoder in {self.run_dir / 'outputs' / 'encoder'}."
            self.status_label.setText(msg)
            show_info(msg)
        elif state == "cancelled" or (last and "cancelled" in last):
            msg = "Job cancelled; Resume continues it from its last checkpoint."
            self.status_label.setText(msg)
            show_info(msg)
        else:
            msg = last[len("protodiff: error: "):] if last else (err[-1] if err else f"the job exited with code {code}")
            self.status_label.setText(msg)
            show_error(msg)
        if proc is not None:
            proc.deleteLater()
        self._update_buttons()
