"""Reading real slides lazily as pyramids with their physical metadata."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from napari_protodiff.core.errors import SlideError
from napari_protodiff.core.slide import open_slide


def test_svs_metadata_and_associated_images(cmu_svs):
    with open_slide(cmu_svs) as s:
        info = s.info
        assert info.backend == "openslide" and info.vendor == "aperio"
        assert info.dimensions == (2220, 2967)
        assert info.mpp == pytest.approx(0.499) and info.mpp_source == "metadata" and info.mpp_problem is None
        assert info.objective_power == 20
        assert set(info.associated_images) == {"label", "macro", "thumbnail"}
        assert (info.levels[0].tile_width, info.levels[0].tile_height) == (240, 240)
        label = s.associated_image("label")
        assert label.ndim == 3 and label.shape[2] == 3 and label.dtype == np.uint8
        with pytest.raises(SlideError, match="no associated image"):
            s.associated_image("barcode")


def test_svs_lazy_pyramid_chunks_align_with_tiles(cmu_svs):
    with open_slide(cmu_svs) as s:
        arr = s.level_array(0)
        assert arr.shape == (2967, 2220, 3) and arr.dtype == np.uint8
        assert all(c % 240 == 0 for c in arr.chunks[0][:-1]) and all(c % 240 == 0 for c in arr.chunks[1][:-1])
        # Reading a slice of the dask array equals a direct region read.
        np.testing.assert_array_equal(arr[500:700, 300:650].compute(), s.read_region(0, 300, 500, 350, 200))


def test_generic_tiff_fast_path_matches_openslide(pyramid_tiff):
    import openslide

    with open_slide(pyramid_tiff) as s, openslide.OpenSlide(str(pyramid_tiff)) as osr:
        assert s.info.backend == "tiff" and len(s.levels) == 6
        assert [lv.width for lv in s.levels] == [d[0] for d in osr.level_dimensions]
        for level, x, y, w, h in [(0, 100, 200, 300, 260), (2, 0, 0, 625, 625), (1, 1000, 1100, 250, 150)]:
            ours = s.read_region(level, x, y, w, h).astype(int)
            ds = osr.level_downsamples[level]
            theirs = np.asarray(osr.read_region((int(x * ds), int(y * ds)), level, (w, h)))[..., :3].astype(int)
            assert np.abs(ours - theirs).mean() < 1.0, (level, np.abs(ours - theirs).mean())


def test_implausible_mpp_is_reported_not_guessed(pyramid_tiff):
    with open_slide(pyramid_tiff) as s:
        assert s.info.mpp is None and s.info.mpp_source is None
        assert s.info.mpp_reported == pytest.approx((896.1, 896.1), rel=1e-3)
        assert "896" in s.info.mpp_problem and "plausible" in s.info.mpp_problem
        with pytest.raises(SlideError, match="--mpp-override"):
            s.require_mpp()
    with open_slide(pyramid_tiff, mpp_override=0.25) as s:
        assert s.info.mpp == 0.25 and s.info.mpp_source == "override"
        assert s.info.level_mpp(1) == pytest.approx(0.5)


@pytest.mark.parametrize("bad", [0.0, -1.0, 896.0, float("nan")])
def test_absurd_override_is_refused(pyramid_tiff, bad):
    with pytest.raises(SlideError, match="not plausible"):
        open_slide(pyramid_tiff, mpp_override=bad)


def test_plain_images_have_no_mpp(he_png, ink_jpeg):
    for p in (he_png, ink_jpeg):
        with open_slide(p) as s:
            assert s.info.backend == "image" and len(s.levels) == 1
            assert s.info.mpp is None and "does not record" in s.info.mpp_problem


def _real_rgb(cmu_svs, h=1536, w=1792):
    with open_slide(cmu_svs) as s:
        return s.read_region(0, 200, 900, w, h)


def test_ome_tiff_pyramid(tmp_path, cmu_svs):
    img = _real_rgb(cmu_svs)
    p = tmp_path / "cmu.ome.tif"
    meta = {"axes": "YXS", "PhysicalSizeX": 0.499, "PhysicalSizeY": 0.499,
            "PhysicalSizeXUnit": "µm", "PhysicalSizeYUnit": "µm"}
    with tifffile.TiffWriter(p, bigtiff=True, ome=True) as tw:
        tw.write(img, tile=(256, 256), subifds=2, compression="zlib", photometric="rgb", metadata=meta)
        tw.write(img[::2, ::2], tile=(256, 256), subfiletype=1, compression="zlib", photometric="rgb")
        tw.write(img[::4, ::4], tile=(256, 256), subfiletype=1, compression="zlib", photometric="rgb")
    with open_slide(p) as s:
        assert s.info.backend == "tiff" and s.info.vendor == "ome"
        assert [lv.downsample for lv in s.levels] == [1.0, 2.0, 4.0]
        assert s.info.mpp == pytest.approx(0.499)
        np.testing.assert_array_equal(s.read_region(0, 0, 0, img.shape[1], img.shape[0]), img)
        np.testing.assert_array_equal(s.level_array(1).compute(), img[::2, ::2])


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_ome_zarr(tmp_path, cmu_svs, zarr_format):
    import zarr

    img = _real_rgb(cmu_svs, 512, 640)
    p = tmp_path / "cmu.ome.zarr"
    g = zarr.open_group(str(p), mode="w", zarr_format=zarr_format)
    levels = [img, img[::2, ::2]]
    for i, lv in enumerate(levels):
        g.create_array(str(i), data=np.moveaxis(lv, -1, 0).copy(), chunks=(3, 256, 256))
    ms = [{
        "axes": [{"name": "c", "type": "channel"}, {"name": "y", "type": "space", "unit": "micrometer"},
                 {"name": "x", "type": "space", "unit": "micrometer"}],
        "datasets": [{"path": str(i), "coordinateTransformations": [{"type": "scale", "scale": [1, 0.5 * 2**i, 0.5 * 2**i]}]}
                     for i in range(2)],
    }]
    if zarr_format == 3:
        g.attrs["ome"] = {"version": "0.5", "multiscales": ms}
    else:
        ms[0]["version"] = "0.4"
        g.attrs["multiscales"] = ms
    with open_slide(p) as s:
        assert s.info.backend == "omezarr" and s.info.mpp == pytest.approx(0.5)
        assert [lv.downsample for lv in s.levels] == [1.0, 2.0]
        np.testing.assert_array_equal(s.read_region(0, 10, 20, 300, 200), img[20:220, 10:310])
        np.testing.assert_array_equal(np.asarray(s.level_array(1)), img[::2, ::2])


def test_plain_tiff(tmp_path, cmu_svs):
    img = _real_rgb(cmu_svs, 400, 500)
    p = tmp_path / "plain.tif"
    tifffile.imwrite(p, img, photometric="rgb", resolution=(1e4 / 0.25, 1e4 / 0.25), resolutionunit="CENTIMETER")
    with open_slide(p) as s:
        assert s.info.mpp == pytest.approx(0.25)
        np.testing.assert_array_equal(s.read_region(0, 0, 0, 500, 400), img)


def test_region_outside_is_white(cmu_svs, pyramid_tiff, he_png):
    for p in (cmu_svs, pyramid_tiff, he_png):
        with open_slide(p) as s:
            w, h = s.info.dimensions
            r = s.read_region(0, w - 10, h - 10, 30, 30)
            assert r.shape == (30, 30, 3) and (r[15:, :] == 255).all() and (r[:, 15:] == 255).all()


def test_slide_pickles_by_reopening(cmu_svs):
    import pickle

    with open_slide(cmu_svs) as s:
        s2 = pickle.loads(pickle.dumps(s))
        np.testing.assert_array_equal(s2.read_region(0, 0, 0, 64, 64), s.read_region(0, 0, 0, 64, 64))


def test_dicom_wsi_series(dicom_dir, cmu_svs):
    """A real DICOM WSI series (CMU-1-Small-Region converted by wsidicomizer), via OpenSlide."""
    for target in (dicom_dir, next(dicom_dir.glob("*.dcm"))):
        with open_slide(target) as s:
            assert s.info.backend == "openslide" and s.info.vendor == "dicom"
            assert s.info.dimensions == (2220, 2967) and len(s.levels) == 5
            assert s.info.mpp == pytest.approx(0.499)
            assert {"label", "macro", "thumbnail"} <= set(s.info.associated_images)
            with open_slide(cmu_svs) as svs:
                # Level 0 holds the SVS's JPEG tiles unchanged.
                np.testing.assert_array_equal(s.read_region(0, 480, 720, 300, 200), svs.read_region(0, 480, 720, 300, 200))
    # Any file of the series and the folder itself identify the same slide.
    from napari_protodiff.core.slide import file_hash

    assert file_hash(dicom_dir) == file_hash(next(dicom_dir.glob("*.dcm")))
