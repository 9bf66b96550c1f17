"""SIGTERM / SIGINT end an evaluation run (and a study) as ``cancelled``, leaving no results that look complete.

The Jobs widget's Cancel sends SIGTERM to the job's process group; a terminal's Ctrl-C
sends SIGINT. Each test runs the real CLI in a subprocess, waits until the run directory
says ``running``, signals it, and checks the state, the exit status and ``outputs/``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from napari_protodiff.core.jobs import RunDir

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

COHORT = "slide,patient,label\n{0},p1,a\n{1},p2,b\n{2},p3,b\n{3},p4,a\n"


def _start(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "napari_protodiff.cli", *args, "--quiet"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_running(proc: subprocess.Popen, run: Path, timeout: float = 300.0) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        assert proc.poll() is None, f"the job ended before it was signalled: {proc.communicate()}"
        if RunDir.is_run_dir(run):
            try:
                st = json.loads((run / "status.json").read_text())
            except (OSError, ValueError):
                st = {}
            if st.get("state") == "running":
                return
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("the job never started running")


def _signal_and_wait(proc: subprocess.Popen, sig: int, delay: float = 1.5) -> tuple[int, str]:
    time.sleep(delay)  # 1.5 s: well inside the job (embedding or training); 0: as it sets up its run directory
    proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError("the job did not end within 120 s of the signal") from None
    return proc.returncode, err


def _assert_cancelled(run: Path, rc: int, err: str) -> None:
    rd = RunDir.open(run)
    assert rc == 130, (err, rd.status, rd.log_path.read_text())
    assert rd.state == "cancelled", (rd.status, err)
    assert "Traceback" not in err, err
    assert not (run / "outputs.partial").exists()
    assert rd.outputs.is_dir() and list(rd.outputs.iterdir()) == [], "a cancelled evaluation must not leave outputs behind"
    assert "cancelled" in rd.log_path.read_text()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_cancels_an_evaluate_mil_run(sig, tmp_path, eval_store, eval_slides):
    cohort = tmp_path / "cohort.csv"
    cohort.write_text(COHORT.format(*eval_slides))
    run = tmp_path / "run"
    proc = _start(["evaluate", "mil", "--cohort", str(cohort), "--store", str(eval_store), "-o", str(run),
                   "--encoder", "builtin", "--device", "cpu", "--folds", "2", "--epochs", "10000", "--n-boot", "10"])
    _wait_running(proc, run)
    rc, err = _signal_and_wait(proc, sig)
    _assert_cancelled(run, rc, err)
    # the cancelled run can be started again with --resume (it is not left "running")
    again = _start(["evaluate", "mil", "--cohort", str(cohort), "--store", str(eval_store), "-o", str(run),
                    "--encoder", "builtin", "--device", "cpu", "--folds", "2", "--epochs", "10000", "--n-boot", "10",
                    "--resume"])
    _wait_running(again, run)
    rc, err = _signal_and_wait(again, signal.SIGTERM, delay=0.0)
    _assert_cancelled(run, rc, err)


def test_sigterm_cancels_a_study_and_its_current_evaluation(tmp_path, eval_store, eval_slides):
    cohort = tmp_path / "cohort.csv"
    cohort.write_text(COHORT.format(*eval_slides))
    cfg = tmp_path / "study.json"
    cfg.write_text(json.dumps({"arms": [], "encoders": {"builtin": "builtin"}, "device": "cpu", "n_boot": 10,
                               "tasks": [{"name": "t", "kind": "mil", "cohort": str(cohort), "store": str(eval_store),
                                          "folds": 2, "epochs": 10000}]}))
    run = tmp_path / "study"
    proc = _start(["study", str(cfg), "-o", str(run)])
    _wait_running(proc, run)
    evaluation = run / "evaluations" / "builtin" / "t"
    _wait_running(proc, evaluation)
    rc, err = _signal_and_wait(proc, signal.SIGTERM)
    assert rc == 130, (err, rd.status, rd.log_path.read_text())
    assert RunDir.open(run).state == "cancelled", err
    assert not (run / "outputs" / "report.md").exists()
    _assert_cancelled(evaluation, rc, err)
