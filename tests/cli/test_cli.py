"""The protodiff command: help, version, info and tile with --json, and one-sentence errors."""

from __future__ import annotations

import json
import subprocess
import sys

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
    p = run("demo", "-o", tmp_path / "demo")
    assert "Outputs in" in p.stdout and (tmp_path / "demo" / "tissue_and_grid.png").stat().st_size > 10_000
    assert PatchStore(tmp_path / "demo" / "patches.zarr").slides()[0].complete
    rep = json.loads((tmp_path / "demo" / "demo_report.json").read_text())
    assert rep["tiling"]["patches_written"] > 0
    err = run("demo", "-o", tmp_path / "demo", check_rc=2)
    assert "--overwrite" in err.stderr
