"""Ctrl-C and SIGTERM end a job as ``cancelled`` with exit status 130, including two ways Python
itself can get that wrong (both seen as flaky failures of tests/evaluation/test_eval_cancel.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from napari_protodiff.core.errors import Cancelled
from napari_protodiff.core.interrupts import cancel_on_signals, signal_received
from napari_protodiff.core.jobs import RunDir

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

# A KeyboardInterrupt raised inside code compiled from a string (dataclasses and namedtuple build
# their methods that way), and caught, as happens when Ctrl-C lands while a lazily imported module
# defines a dataclass.
_INTERRUPTED_EXEC = textwrap.dedent("""
    import os, signal, sys
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        exec("import os, signal\\nos.kill(os.getpid(), signal.SIGINT)\\nfor _ in range(10000): pass")
    except KeyboardInterrupt:
        pass
""")


def _run_module(tmp_path, body: str, setup: str = "") -> int:
    (tmp_path / "interrupted_mod.py").write_text(textwrap.dedent(setup) + _INTERRUPTED_EXEC + textwrap.dedent(body))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "interrupted_mod"], cwd=tmp_path, env=env,
                          capture_output=True, timeout=120).returncode


def test_python_m_would_die_by_sigint_after_a_handled_interrupt_in_exec(tmp_path):
    # the CPython behaviour the CLI works around: a handled KeyboardInterrupt still kills `python -m` at exit
    assert _run_module(tmp_path, "sys.exit(130)\n") == -signal.SIGINT


def test_forgetting_the_handled_interrupt_keeps_the_exit_status(tmp_path):
    rc = _run_module(tmp_path, "_forget_handled_interrupt()\nsys.exit(130)\n",
                     setup="from napari_protodiff.cli import _forget_handled_interrupt\n")
    assert rc == 130


@pytest.mark.parametrize("argv", [["--version"], ["tile"], ["no-such-command"]])
def test_cli_main_forgets_handled_interrupts_on_every_exit(argv, monkeypatch):
    import napari_protodiff.cli as cli

    calls = []
    monkeypatch.setattr(cli, "_forget_handled_interrupt", lambda: calls.append(1))
    cli.main(argv)
    assert calls == [1]


def _interrupted_import(**kwargs):
    """Ctrl-C while a C extension initialises, as pybind11 and Cython report it: ImportError."""
    try:
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(10_000):
            pass
    except KeyboardInterrupt:
        raise ImportError("initialization failed") from None


def test_error_after_a_signal_is_a_cancellation_not_a_failure(tmp_path):  # evaluations, studies
    rd = RunDir.prepare(tmp_path / "run", "test", {})
    with pytest.raises(Cancelled, match=r"Cancelled \(Ctrl-C\)"):
        with cancel_on_signals(), rd.running():
            _interrupted_import()
    assert RunDir.open(tmp_path / "run").state == "cancelled"
    assert signal_received() is None  # forgotten once the command is over


def test_error_without_a_signal_still_fails(tmp_path):
    rd = RunDir.prepare(tmp_path / "run", "test", {})
    with pytest.raises(ImportError):
        with cancel_on_signals(), rd.running():
            raise ImportError("initialization failed")
    assert RunDir.open(tmp_path / "run").state == "failed"


def test_cli_reports_an_import_broken_by_ctrl_c_as_an_interruption(monkeypatch, capsys):
    import napari_protodiff.cli as cli

    monkeypatch.setattr(cli, "app", _interrupted_import)
    assert cli.main(["tile", "x.svs"]) == 130
    assert "interrupted" in capsys.readouterr().err


def test_cli_still_crashes_on_an_import_error_of_its_own(monkeypatch):
    import napari_protodiff.cli as cli

    def broken(**kwargs):
        raise ImportError("initialization failed")

    monkeypatch.setattr(cli, "app", broken)
    with pytest.raises(ImportError):
        cli.main(["tile", "x.svs"])


def test_a_signal_whose_exception_python_dropped_still_cancels_at_the_next_step(tmp_path, monkeypatch):
    """SIGTERM landing in a ``__del__``: Python prints the handler's exception ("Exception ignored")
    and goes on, SIGTERM now ignored; the job still ends ``cancelled`` at its next progress event
    instead of running on until it is killed (a flake of the Evaluation widget's cancel test)."""
    from napari_protodiff.cli._common import run_with_progress
    from napari_protodiff.core.progress import Progress

    class Finalised:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(10_000):  # the handler runs here, inside __del__
                pass

    from napari_protodiff.core.interrupts import Terminated

    dropped = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: dropped.append(u.exc_type))
    rd = RunDir.prepare(tmp_path / "run", "test", {})
    steps = []

    def job():
        with rd.running():
            for i in range(50):
                if i == 3:
                    Finalised()  # collected at once
                steps.append(i)
                yield Progress(i + 1, 50, f"step {i}")

    for quiet in (True, False):
        steps.clear()
        with pytest.raises(Cancelled, match=r"Cancelled \(SIGTERM\)"):
            with cancel_on_signals():
                run_with_progress(job(), quiet=quiet)
        assert steps == [0, 1, 2, 3]
        assert RunDir.open(tmp_path / "run").state == "cancelled"
    assert dropped == [Terminated, Terminated]  # Python did drop the handler's exception
    assert signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN  # the command's handlers are gone
