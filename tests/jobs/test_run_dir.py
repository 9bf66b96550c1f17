"""The run-directory convention: ownership, atomic status, states, metrics, listing."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from napari_protodiff.core.errors import Cancelled, ProtodiffError
from napari_protodiff.core.jobs import RunDir, config_hash, find_runs


def test_prepare_writes_the_layout_and_owns_the_folder(tmp_path):
    rd = RunDir.prepare(tmp_path / "r", "embed", {"a": 1, "b": [1, 2]}, manifest={"seed": 3})
    for name in ("run.json", "config.json", "manifest.json", "status.json", "checkpoints", "outputs"):
        assert (rd.path / name).exists(), name
    assert rd.kind == "embed" and rd.state == "new" and rd.manifest["seed"] == 3
    assert "numpy" in rd.manifest["versions"] and rd.owner["config_hash"] == config_hash({"b": [1, 2], "a": 1})
    with pytest.raises(ProtodiffError, match="already holds this embed job.*--resume"):
        RunDir.prepare(tmp_path / "r", "embed", {"a": 1, "b": [1, 2]})
    with pytest.raises(ProtodiffError, match="belongs to another embed job"):
        RunDir.prepare(tmp_path / "r", "embed", {"a": 2, "b": [1, 2]}, resume=True)
    with pytest.raises(ProtodiffError, match="belongs to a 'embed' job, not 'pretrain'"):
        RunDir.prepare(tmp_path / "r", "pretrain", {"a": 1, "b": [1, 2]}, resume=True)
    assert RunDir.prepare(tmp_path / "r", "embed", {"a": 1, "b": [1, 2]}, resume=True).path == rd.path
    (tmp_path / "f").write_text("x")
    with pytest.raises(ProtodiffError, match="is a file"):
        RunDir.prepare(tmp_path / "f", "embed", {})
    with pytest.raises(ProtodiffError, match="not a protodiff run directory"):
        RunDir.open(tmp_path)


def test_running_context_sets_the_final_state(tmp_path):
    rd = RunDir.prepare(tmp_path / "ok", "x", {})
    with rd.running(total=2):
        assert rd.state == "running"
        rd.set_status("finished", step=2)
    assert rd.state == "finished"

    rd = RunDir.prepare(tmp_path / "bad", "x", {})
    with pytest.raises(ProtodiffError):
        with rd.running():
            raise ProtodiffError("the store is empty.")
    assert rd.state == "failed" and rd.status["error"] == "the store is empty."

    rd = RunDir.prepare(tmp_path / "c", "x", {})
    with pytest.raises(Cancelled):
        with rd.running():
            raise Cancelled("stop")
    assert rd.state == "cancelled"

    rd = RunDir.prepare(tmp_path / "early", "x", {})
    with rd.running():
        pass  # left without finishing: never looks finished
    assert rd.state == "cancelled"


def test_a_killed_job_is_reported_interrupted(tmp_path):
    rd = RunDir.prepare(tmp_path / "k", "x", {})
    code = f"from pathlib import Path; from napari_protodiff.core.jobs import RunDir; RunDir(Path({str(rd.path)!r})).set_status('running')"
    subprocess.run([sys.executable, "-c", code], check=True)  # that process is gone now
    assert rd.status["state"] == "running" and rd.state == "interrupted"


def test_metrics_skip_a_torn_line_and_truncate_for_resume(tmp_path):
    rd = RunDir.prepare(tmp_path / "m", "x", {})
    for s in range(1, 6):
        rd.append_metrics({"step": s, "loss": 1.0 / s})
    with open(rd.metrics_path, "a") as f:
        f.write('{"step": 6, "lo')  # killed mid-write
    assert [m["step"] for m in rd.metrics()] == [1, 2, 3, 4, 5]
    rd.truncate_metrics(3)
    assert [m["step"] for m in rd.metrics()] == [1, 2, 3]
    assert rd.summary()["last_metrics"] == {"step": 3, "loss": 1 / 3}


def test_status_writes_are_atomic(tmp_path):
    rd = RunDir.prepare(tmp_path / "a", "x", {})
    for i in range(50):
        rd.set_status("running", step=i)
        json.loads((rd.path / "status.json").read_text())
    assert not [p for p in os.listdir(rd.path) if p.endswith(".tmp")]


def test_find_runs_and_the_jobs_cli(tmp_path, capsys):
    from napari_protodiff.cli import main

    RunDir.prepare(tmp_path / "a", "pretrain", {"x": 1})
    RunDir.prepare(tmp_path / "deep" / "b", "embed", {"x": 2})
    (tmp_path / "a" / "outputs" / "nested").mkdir()
    assert sorted(r.path.name for r in find_runs(tmp_path)) == ["a", "b"]

    def jobs(*args):  # `protodiff jobs ARGS` in this process: (exit status, stdout, stderr)
        code = main(["jobs", *map(str, args)])
        out = capsys.readouterr()
        return code, out.out, out.err

    code, out, _ = jobs("list", tmp_path, "--json")
    assert code == 0 and {r["kind"] for r in json.loads(out)} == {"pretrain", "embed"}
    code, out, _ = jobs("show", tmp_path / "a")
    assert code == 0 and "kind        pretrain" in out and "state       new" in out
    code, _, err = jobs("show", tmp_path)
    assert code == 2 and err.strip().endswith("not a protodiff run directory (no run.json).")
