"""The npe2 reader and sample data: lazy multiscale RGB layers in µm, honest about unknown pixel sizes."""

from __future__ import annotations

import subprocess
import sys

import dask.array as da
import numpy as np
import pytest

from napari_protodiff._napari.reader import napari_get_reader, slide_layer_data
from napari_protodiff.core.store import PatchStore

pytestmark = pytest.mark.gui

PLUGIN = "napari-protodiff"


def test_get_reader_declines_what_is_not_a_slide(tmp_path):
    (tmp_path / "notes.txt").write_text("not a slide")
    PatchStore.create(tmp_path / "patches.zarr", 64, 0.5)
    (tmp_path / "plain").mkdir()
    assert napari_get_reader(str(tmp_path / "notes.txt")) is None
    assert napari_get_reader(str(tmp_path / "patches.zarr")) is None  # a patch store, not a slide
    assert napari_get_reader(str(tmp_path / "plain")) is None


def test_reader_svs_layer_in_micrometres(cmu_svs, make_napari_viewer, notes):
    read = napari_get_reader(str(cmu_svs))
    assert read is not None
    [(data, kwargs, kind)] = read(str(cmu_svs))
    assert kind == "image" and isinstance(data, da.Array) and data.shape == (2967, 2220, 3)
    assert kwargs["rgb"] and not kwargs["multiscale"]
    assert kwargs["scale"] == pytest.approx((0.499, 0.499))
    md = kwargs["metadata"]
    assert md["path"] == str(cmu_svs.resolve())
    assert md["slide_info"]["dimensions"] == [2220, 2967]
    assert md["slide_info"]["mpp_source"] == "metadata" and md["units_warning"] is None

    viewer = make_napari_viewer()
    [layer] = viewer.open(str(cmu_svs), plugin=PLUGIN)
    assert [str(u) for u in layer.units] == ["micrometer", "micrometer"]
    assert tuple(layer.scale) == pytest.approx((0.499, 0.499))
    # the far corner of the slide is at width * mpp µm in the world
    assert layer.data_to_world((2966.5, 2219.5)) == pytest.approx((2967 * 0.499 - 0.2495, 2220 * 0.499 - 0.2495))
    assert not [n for n in notes() if "WARNING" in n[0] or "ERROR" in n[0]]


def test_pyramid_tiff_opens_lazily_in_pixel_units_with_a_warning(pyramid_tiff, make_napari_viewer, notes):
    viewer = make_napari_viewer()
    [layer] = viewer.open(str(pyramid_tiff), plugin=PLUGIN)
    assert layer.multiscale and len(layer.data) == 6
    assert all(isinstance(level, da.Array) for level in layer.data)  # lazy: nothing read up front
    assert [lv.shape[:2] for lv in layer.data][:3] == [(2500, 2500), (1250, 1250), (625, 625)]
    assert tuple(layer.scale) == (1.0, 1.0)
    assert [str(u) for u in layer.units] == ["pixel", "pixel"]
    assert "896" in layer.metadata["units_warning"] and layer.metadata["slide_info"]["mpp"] is None
    warnings = [m for sev, m in notes() if "WARNING" in sev]
    assert len(warnings) == 1 and "896" in warnings[0] and "pixel units" in warnings[0]


def test_mpp_override_gives_a_physical_layer(pyramid_tiff):
    data, kwargs, _ = slide_layer_data(pyramid_tiff, mpp_override=0.25)
    assert len(data) == 6
    assert kwargs["scale"] == (0.25, 0.25) and kwargs["units"] == ("µm", "µm")
    md = kwargs["metadata"]
    assert md["units_warning"] is None and md["mpp_override"] == 0.25
    assert md["slide_info"]["mpp_source"] == "override" and "896" in md["slide_info"]["mpp_problem"]


def test_broken_slide_is_a_notification_not_a_crash(tmp_path, make_napari_viewer, notes):
    bad = tmp_path / "broken.svs"
    bad.write_bytes(b"this is not a slide" * 100)
    viewer = make_napari_viewer()
    assert viewer.open(str(bad), plugin=PLUGIN) == []
    assert len(viewer.layers) == 0
    [(sev, msg)] = notes()
    assert "ERROR" in sev and "broken.svs" in msg
    assert "Traceback" not in msg and msg.count("\n") == 0


def test_sample_data_loads(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, "cmu-1-small-region")
    [layer] = viewer.layers
    assert layer.rgb and layer.data.shape == (2967, 2220, 3)
    assert tuple(layer.scale) == pytest.approx((0.499, 0.499))
    assert layer.metadata["slide_info"]["vendor"] == "aperio"
    assert np.asarray(layer.data[1000:1002, 1000:1002]).dtype == np.uint8


def test_plugin_modules_import_light():
    """Reader, sample data and widget load without torch, and the reader/sample without dask or Qt."""
    code = (
        "import sys\n"
        "import napari_protodiff._napari.reader, napari_protodiff._napari.sample_data\n"
        "light = not any(m in sys.modules for m in ('dask', 'torch', 'qtpy', 'zarr', 'openslide'))\n"
        "import napari_protodiff._napari.slides_widget\n"
        "print(light, 'torch' in sys.modules, 'diffusers' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "False", "False"]


def test_dicom_series_folder_opens_as_a_multiscale_layer(dicom_dir):
    reader = napari_get_reader(str(dicom_dir))
    assert reader is not None
    (data, kwargs, kind) = reader(str(dicom_dir))[0]
    assert kind == "image" and kwargs["multiscale"] and len(data) == 5
    assert kwargs["scale"] == pytest.approx((0.499, 0.499)) and kwargs["units"] == ("µm", "µm")
    assert kwargs["metadata"]["slide_info"]["vendor"] == "dicom"
