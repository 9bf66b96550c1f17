"""The protodiff command: help, version, info and tile with --json, and one-sentence errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from napari_protodiff import __version__
from napari_protodiff.core.store import PatchStore


def run(*args, check_rc=0):
    p = subprocess.run([sys.executable, "-m", "napari_protodiff.cli", *map(str, args)], capture_output=True, text=True)
    if check_rc is not None:
        assert p.returncode == check_rc, (p.returncode, p.stdout, p.stderr)
    return p


def test_help_and_version():
    out = run("--help").stdout
    for cmd in ("info", "tile", "demo"):
        assert cmd in out
    assert run("--version").stdout.strip() == f"protodiff {__version__}"
    assert "--mpp-override" in run("tile", "--help").stdout


@pytest.mark.parametrize("args, says", [(["no-such-command"], "No such command 'no-such-command'"),
                                        (["tile"], "Missing argument"),
                                        (["tile", "x.svs", "--no-such-option"], "No such option: --no-such-option")])
def test_usage_errors_exit_2_with_a_usage_line_not_a_traceback(args, says):
    p = run(*args, check_rc=2)
    assert says in p.stderr and "Usage: protodiff" in p.stderr
    assert "Traceback" not in p.stderr, p.stderr


def test_console_script_is_installed():
    import shutil

    exe = shutil.which("protodiff") or str(__import__("pathlib").Path(sys.executable).parent / "protodiff")
    p = subprocess.run([exe, "--version"], capture_output=True, text=True)
    assert p.returncode == 0 and __version__ in p.stdout


def test_info_json(cmu_svs, pyramid_tiff):
    d = json.loads(run("info", cmu_svs, "--json").stdout)
    assert d["dimensions"] == [2220, 2967] and d["mpp"] == pytest.approx(0.499) and d["vendor"] == "aperio"
    assert d["levels"][0]["tile_width"] == 240 and "label" in d["associated_images"]
    d = json.loads(run("info", pyramid_tiff, "--json").stdout)
    assert d["mpp"] is None and "896" in d["mpp_problem"] and len(d["levels"]) == 6
    d = json.loads(run("info", pyramid_tiff, "--json", "--mpp-override", "0.25").stdout)
    assert d["mpp"] == 0.25 and d["mpp_source"] == "override" and d["levels"][1]["mpp"] == pytest.approx(0.5)
    text = run("info", pyramid_tiff).stdout
    assert "UNKNOWN" in text and "--mpp-override" in text


def test_tile_json_then_store_info(tmp_path, cmu_svs, he_png):
    store = tmp_path / "s.zarr"
    d = json.loads(run("tile", cmu_svs, he_png, "-o", store, "--size", "128", "--mpp-override", "0.5",
                       "--workers", "2", "--json").stdout)
    assert [s["action"] for s in d["slides"]] == ["new", "new"]
    assert d["patches_written"] == sum(s["n_patches"] for s in d["slides"]) > 0 and d["patches_per_second"] > 0
    st = PatchStore(store)
    assert st.slides()[0].attrs["mpp_source"] == "override"
    info = json.loads(run("info", store, "--json").stdout)
    assert info["n_patches"] == d["patches_written"] and {s["status"] for s in info["slides"]} == {"complete"}
    again = json.loads(run("tile", cmu_svs, "-o", store, "--size", "128", "--mpp-override", "0.5", "--json").stdout)
    assert again["slides"][0]["action"] == "skip" and again["patches_written"] == 0


def test_demo_runs_and_says_where_outputs_are(tmp_path):
    """The default demo: every stage leaves its output, and the last one, a tiny study, reuses the diffusion stage's."""
    p = run("demo", "-o", tmp_path / "demo")
    out = tmp_path / "demo"
    assert "Outputs in" in p.stdout and (out / "tissue_and_grid.png").stat().st_size > 10_000
    assert PatchStore(out / "patches.zarr").slides()[0].complete
    rep = json.loads((out / "demo_report.json").read_text())
    assert rep["tiling"]["patches_written"] > 0
    for key in ("patches_mosaic", "prototype_map", "prototype_exemplars", "guided_samples"):
        assert Path(rep["outputs"][key]).stat().st_size > 1_000, key
    assert rep["prototypes"]["embedding"]["patches_embedded"] == rep["tiling"]["patches_written"]
    assert (out / "diffusion-model").is_dir() and rep["diffusion"]["training"]
    assert sorted(r["guidance"] for r in rep["diffusion"]["fidelity"]["runs"]) == [0.0, 10.0]
    for store in ("synthetic.zarr", "synthetic-unguided.zarr"):
        assert [e.n_patches for e in PatchStore(out / store).slides() if e.complete] == [32], store
    # seconds of every stage, in the report and the final printout
    assert set(rep["stage_seconds"]) >= {"slide", "tiling", "prototypes", "diffusion: training", "study"}
    assert all(v >= 0 for v in rep["stage_seconds"].values()) and "study " in p.stdout.split("Outputs in")[0]
    assert set(rep["stage_cpu_seconds"]) == set(rep["stage_seconds"]) and rep["stage_cpu_seconds"]["study"] > 0

    # the tiny study: reused the demo's model and synthetic stores (no diffusion, no sampling of its own) ...
    run_dir = out / "study" / "run"
    stages = json.loads((run_dir / "stages.json").read_text())
    assert Path(stages["sample:synthetic.zarr"]).resolve() == (out / "synthetic.zarr").resolve()
    assert Path(stages["sample:synthetic-unguided.zarr"]).resolve() == (out / "synthetic-unguided.zarr").resolve()
    assert "diffusion" not in stages and not (run_dir / "diffusion").exists() and not (run_dir / "synthetic.zarr").exists()
    arms = ("real", "synthetic", "hybrid", "unguided", "random")
    assert all(Path(stages[f"pretrain:{a}"]).is_dir() for a in arms)
    assert Path(rep["outputs"]["encoder"]) == Path(stages["pretrain:real"])
    # ... and wrote a report with its table, plots and the smoke-scale caveat
    report = Path(rep["outputs"]["study_report"])
    assert report == run_dir / "outputs" / "report.md"
    text = report.read_text()
    assert "Smoke-scale demonstration" in text and "not meaningful" in text and "real (reference)" in text
    for plot in ("planted_auc.png", "planted_roc.png", "data_size.png"):
        assert f"plots/{plot}" in text and (run_dir / "outputs" / "plots" / plot).stat().st_size > 1_000, plot
    table = json.loads((run_dir / "outputs" / "table.json").read_text())
    assert {r["encoder"] for r in table} == {*arms, "builtin"}
    assert {r["task"] for r in table} == {"planted"} and {r["metric"] for r in table} >= {"auc", "balanced_accuracy"}
    assert all(0.0 <= r["value"] <= 1.0 for r in table if r["metric"] == "auc")
    # the printout ends with the report's path and the headline table: one row per encoder
    assert f"study report     {report}" in p.stdout and "not meaningful" in p.stdout
    head = p.stdout.split("not meaningful")[-1]
    assert "| encoder | planted auc | planted balanced_accuracy | planted f1_macro |" in head
    for enc in (*arms[1:], "builtin"):
        assert f"\n| {enc} | " in head, enc
    assert "\n| real (reference) | " in head

    err = run("demo", "-o", out, check_rc=2)
    assert "--overwrite" in err.stderr
