"""npe2 finds and validates the plugin manifest, from the editable install and from a built wheel."""

import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CHECK = """
from npe2 import PluginManifest
import napari_protodiff, pathlib
m = PluginManifest.from_distribution("napari-protodiff")
m.validate_imports()
assert m.contributions.readers and m.contributions.widgets and m.contributions.sample_data
print(pathlib.Path(napari_protodiff.__file__).parent)
print(sorted(c.id for c in m.contributions.commands))
"""


def test_manifest_from_installed_distribution():
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, check=True).stdout
    assert "napari-protodiff.get_reader" in out


@pytest.mark.slow
def test_manifest_from_built_wheel(tmp_path):
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path / "dist"), str(ROOT)],
                   check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("napari_protodiff-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "napari_protodiff/napari.yaml" in names
    assert "napari_protodiff/data/CMU-1-Small-Region.svs" in names
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, check=True, env=env,
                         cwd=tmp_path).stdout
    # The manifest was resolved from the wheel's copy, not the editable checkout.
    assert out.splitlines()[0] == str(target / "napari_protodiff")
    yaml_text = (target / "napari_protodiff" / "napari.yaml").read_text()
    assert yaml_text == (ROOT / "napari.yaml").read_text()
