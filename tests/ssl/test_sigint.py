"""Ctrl-C in a terminal (SIGINT to the whole process group, loader workers included) cancels
``protodiff pretrain`` cleanly: exit status 130, run state "cancelled", and a checkpoint
that ``--resume`` continues from."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="process groups and SIGINT are POSIX")

PROTODIFF = Path(sys.executable).with_name("protodiff")
# tiny preset, made smaller still; 1 loader worker process so the group has one to interrupt
ARGS = ["--preset", "tiny", "--batch-size", "8", "--images-per-epoch", "32", "--epochs", "2", "--out-dim", "256",
        "--workers", "1", "--threads", "1", "--checkpoint-every", "1000", "--seed", "3"]


def _cmd(store, run, *extra):
    return [str(PROTODIFF), "pretrain", "--real", str(store), "-o", str(run), *ARGS, *extra]


def _env():
    return {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONUNBUFFERED": "1"}


def _foreground_job():
    """In the child: its own process group with SIGINT at its default, as a terminal's foreground job has it
    (a job started in the background of a non-interactive shell, like this test's runner, inherits SIGINT ignored)."""
    os.setpgid(0, 0)
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - a process we cannot signal still exists
        return True
    return True


def _wait_for_step(run: Path, proc: subprocess.Popen, timeout: float = 300.0) -> None:
    metrics = run / "metrics.jsonl"
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            pytest.fail(f"protodiff pretrain ended (status {proc.returncode}) before its first step: "
                        f"{proc.stderr.read().decode(errors='replace')}")
        if metrics.is_file() and metrics.read_text().strip():
            return
        time.sleep(0.05)
    pytest.fail(f"no training step was logged within {timeout:.0f} s")


@pytest.mark.skipif(not PROTODIFF.exists(), reason="the protodiff script is not installed next to this Python")
def test_ctrl_c_cancels_cleanly_and_resumes(real_store, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(_cmd(real_store, run, "--quiet"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=_env(), preexec_fn=_foreground_job)
    pgid = proc.pid
    try:
        _wait_for_step(run, proc)
        workers = [int(p) for p in subprocess.run(["pgrep", "-g", str(pgid)], capture_output=True, text=True)
                   .stdout.split()]
        assert len(workers) >= 2, "the loader worker process should be running in the job's process group"
        os.killpg(pgid, signal.SIGINT)  # what a terminal's Ctrl-C does
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:  # only our own group, only if the test failed to stop it
            os.killpg(pgid, signal.SIGKILL)
            proc.wait()
    err = err.decode(errors="replace")
    assert proc.returncode == 130, err
    assert "Traceback" not in err, err
    t0 = time.monotonic()
    while _group_alive(pgid) and time.monotonic() - t0 < 10:  # the loader worker exits with the job
        time.sleep(0.05)
    assert not _group_alive(pgid), "a process of the cancelled job (a loader worker?) outlived it"

    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "cancelled", status
    ckpt = run / "checkpoints" / "last.pt"
    assert ckpt.is_file()
    import torch

    stopped_at = int(torch.load(ckpt, weights_only=True)["step"])
    total = 2 * 32 // 8
    assert 1 <= stopped_at < total
    n_metrics = len((run / "metrics.jsonl").read_text().splitlines())
    assert n_metrics == stopped_at  # the checkpoint holds every step that was logged

    res = subprocess.run(_cmd(real_store, run, "--resume", "--json"), capture_output=True, env=_env(), timeout=600)
    assert res.returncode == 0, res.stderr.decode(errors="replace")
    out = json.loads(res.stdout)
    assert out["resumed_from"] == stopped_at
    assert out["steps"] == total
    assert json.loads((run / "status.json").read_text())["state"] == "finished"
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == list(
        range(1, total + 1))
