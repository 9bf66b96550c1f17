"""A ``protodiff`` command run as a subprocess of the viewer, and its run directory read as it changes.

Shared by the dock widgets that start long jobs (the Jobs widget: pretraining,
evaluations, studies), so process handling lives in one place:

- :class:`SubprocessJob` starts ``napari_protodiff.cli.main(ARGS)`` — the ``protodiff``
  command itself — with this Python in a :class:`QProcess`, as the leader of a new
  process group, collects its stderr, and ends it: :meth:`~SubprocessJob.cancel` sends
  SIGTERM to the whole group (the job and any workers it started) and, if the job is
  still there after a grace period, SIGKILL to that same group (never to a job started
  later, e.g. its resume). The job runs at a lower CPU priority (``nice`` +10), so that
  on a machine whose cores it fills the viewer still gets the CPU first. ``ended`` carries the exit code and the job's one-sentence
  error, if it printed one.
- :class:`MetricsTail` reads only the new whole lines of a run's ``metrics.jsonl``.
- :func:`last_line` reads a file's last line without reading the file.

No torch and no napari here (Qt only).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

from qtpy.QtCore import QObject, QProcess, QTimer, Signal

ERROR_PREFIX = "protodiff: error: "
TERMINATE_GRACE_MS = 60_000

NICENESS = 10
# The child makes itself a process-group leader, lowers its CPU priority (the viewer's event loop comes first
# when the job uses every core), then runs the protodiff command with the given arguments.
_BOOT = ("import os, sys\n"
         "if hasattr(os, 'setpgid'): os.setpgid(0, 0)\n"
         f"if hasattr(os, 'nice'): os.nice({NICENESS})\n"
         "from napari_protodiff.cli import main\n"
         "sys.exit(main(sys.argv[1:]))")


def error_line(stderr: str) -> str | None:
    """The job's one-sentence error (the last ``protodiff: error: ...`` line of its stderr), or None."""
    for ln in reversed(stderr.strip().splitlines()):
        if ln.startswith(ERROR_PREFIX):
            return ln[len(ERROR_PREFIX):]
    return None


class SubprocessJob(QObject):
    """One ``protodiff ARGS`` subprocess at a time; ``ended(exit_code, error_sentence_or_empty)`` when it exits."""

    ended = Signal(int, str)

    def __init__(self, parent: QObject | None = None, grace_ms: int = TERMINATE_GRACE_MS) -> None:
        super().__init__(parent)
        self.process: QProcess | None = None
        self.args: list[str] = []
        self.grace_ms = grace_ms
        self.stderr = ""

    @property
    def busy(self) -> bool:
        return self.process is not None and self.process.state() != QProcess.ProcessState.NotRunning

    def command_line(self, args: list[str]) -> list[str]:
        """The program and arguments run for ``protodiff ARGS``."""
        return [sys.executable, "-c", _BOOT, *args, "--quiet"]

    def start(self, args: list[str]) -> None:
        if self.busy:
            raise RuntimeError("a job is already running")
        self.args = list(args)
        self.stderr = ""
        prog, *argv = self.command_line(args)
        proc = QProcess(self)
        proc.setProgram(prog)
        proc.setArguments(argv)
        proc.readyReadStandardError.connect(lambda: self._read_stderr(proc))
        proc.finished.connect(lambda code, _status=None: self._on_finished(proc, code))
        self.process = proc
        proc.start()

    def _signal_group(self, proc: QProcess, sig: int) -> None:
        pid = int(proc.processId())
        if pid <= 0:
            return
        try:
            os.killpg(pid, sig)  # the child leads its own group (see _BOOT)
        except (AttributeError, ProcessLookupError, PermissionError):  # no process groups, or not set up yet
            proc.terminate() if sig == signal.SIGTERM else proc.kill()

    def cancel(self) -> bool:
        """SIGTERM to the job's process group (the job ends ``cancelled``); SIGKILL after the grace period."""
        if not self.busy:
            return False
        proc = self.process
        self._signal_group(proc, signal.SIGTERM)
        QTimer.singleShot(self.grace_ms, lambda: self._kill_if_running(proc))
        return True

    def kill(self) -> None:
        """End the job's process group at once (SIGKILL): the run is left ``interrupted``."""
        if self.busy:
            self._signal_group(self.process, getattr(signal, "SIGKILL", signal.SIGTERM))

    def _kill_if_running(self, proc: QProcess) -> None:
        if proc is self.process and self.busy:
            self._signal_group(proc, getattr(signal, "SIGKILL", signal.SIGTERM))

    def _read_stderr(self, proc: QProcess) -> None:
        if proc is self.process:
            self.stderr += bytes(proc.readAllStandardError()).decode(errors="replace")

    def _on_finished(self, proc: QProcess, code: int) -> None:
        if proc is not self.process:
            return
        self._read_stderr(proc)
        self.process = None
        proc.deleteLater()
        err = error_line(self.stderr)
        if err is None and code != 0:
            lines = self.stderr.strip().splitlines()
            err = lines[-1] if lines else f"the job exited with code {code}"
        self.ended.emit(int(code), err or "")


class MetricsTail:
    """The new whole lines of a ``metrics.jsonl`` since the last read (starting over if the file shrank)."""

    def __init__(self) -> None:
        self.path: Path | None = None
        self.pos = 0

    def reset(self, path: str | os.PathLike | None) -> None:
        self.path = None if path is None else Path(path)
        self.pos = 0

    def read(self) -> tuple[list[dict], bool]:
        """(new records, whether the file was rewritten so earlier records are void)."""
        if self.path is None:
            return [], False
        restarted = False
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < self.pos:  # rewritten (a resume truncated it)
                    self.pos, restarted = 0, True
                f.seek(self.pos)
                chunk = f.read()
        except FileNotFoundError:
            return [], False
        end = chunk.rfind(b"\n") + 1
        self.pos += end
        out = []
        for line in chunk[:end].splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out, restarted


def last_line(path: str | os.PathLike, limit: int = 8192) -> str | None:
    """The last whole line of a text file (reading at most ``limit`` bytes from its end), or None."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            f.seek(max(0, size - limit))
            tail = f.read()
    except OSError:
        return None
    lines = [ln for ln in tail.split(b"\n") if ln.strip()]
    if not tail.endswith(b"\n") and lines:
        lines = lines[:-1]  # a line being written
    return lines[-1].decode(errors="replace") if lines else None
