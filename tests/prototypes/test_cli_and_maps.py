"""`protodiff embed / prototypes / prototype-map` (in process, --json) and the map exports."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_protodiff.cli import main
from napari_protodiff.core.prototype_map import prototype_label_image
from napari_protodiff.core.prototypes import slide_assignments
from napari_protodiff.core.store import PatchStore


def run(capsys, *args):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def cli_store(two_specimen_store, tmp_path_factory):
    import shutil

    p = tmp_path_factory.mktemp("cli") / "cli.zarr"
    shutil.copytree(two_specimen_store, p)
    return p


def test_embed_prototypes_and_map_through_the_cli(cli_store, tmp_path, capsys):
    code, out, err = run(capsys, "embed", cli_store, "--json")
    assert code == 0, err
    d = json.loads(out)
    assert d["key"] == "builtin" and d["patches_embedded"] == 144 and d["device"] == "cpu"

    code, out, err = run(capsys, "embed", cli_store)
    assert code == 2 and "pass --overwrite" in err and err.count("\n") == 1

    code, out, err = run(capsys, "prototypes", cli_store, "--scan-k", "2:4", "--json")
    assert code == 0, err
    assert [r["k"] for r in json.loads(out)] == [2, 3, 4]

    table = tmp_path / "table.csv"
    code, out, err = run(capsys, "prototypes", cli_store, "-k", "2", "--seed", "1", "--table", table, "--json")
    assert code == 0, err
    d = json.loads(out)
    assert d["k"] == 2 and sum(d["sizes"]) == 144 and d["table"] == str(table)
    assert len(table.read_text().splitlines()) == 145

    code, out, err = run(capsys, "prototypes", cli_store, "-k", "3")
    assert code == 2 and "already has prototypes" in err and "--overwrite" in err

    code, out, err = run(capsys, "prototypes", cli_store, "-k", "500", "--overwrite")
    assert code == 2 and "larger than the number of patches" in err

    sid = PatchStore(cli_store).slide_ids[0]
    code, out, err = run(capsys, "prototype-map", cli_store, "--slide", sid, "-o", tmp_path / "map.tif",
                         "--png", tmp_path / "map.png", "--json")
    assert code == 0, err
    d = json.loads(out)
    assert d["pixel_size_um"] == pytest.approx(64.0) and (tmp_path / "map.png").stat().st_size > 1000

    code, out, err = run(capsys, "prototype-map", cli_store, "--slide", "missing", "-o", tmp_path / "x.tif")
    assert code == 2 and "no slide 'missing'" in err and not (tmp_path / "x.tif").exists()

    code, out, err = run(capsys, "embed", "--list-encoders", "--json")
    assert code == 0 and {"builtin", "uni", "phikon"} <= {r["name"] for r in json.loads(out)}


def test_label_image_exports(fitted_small, tmp_path):
    import tifffile
    import zarr

    from napari_protodiff.core.prototype_map import export_prototype_map

    st = PatchStore(fitted_small)
    sid = st.slide_ids[1]
    li = prototype_label_image(st, sid)
    labels, _ = slide_assignments(st, sid)
    entry = st.slide(sid)
    assert li.labels.shape == tuple(entry.attrs["grid_shape"]) and li.pixel_size_um == pytest.approx(64.0)
    assert (li.labels > 0).sum() == entry.n_patches
    x, y = entry.coords()[0]
    assert li.labels[int(y // li.footprint_px), int(x // li.footprint_px)] == labels[0] + 1

    out = export_prototype_map(fitted_small, sid, tmp_path / "m.ome.tif", tmp_path / "m.png")
    with tifffile.TiffFile(out["map"]) as tf:
        assert np.array_equal(tf.asarray(), li.labels)
        assert 'PhysicalSizeX="64.0"' in tf.ome_metadata
    g = zarr.open_group(str(export_prototype_map(fitted_small, sid, tmp_path / "m.zarr")["map"]), mode="r")
    assert np.array_equal(g["0"][:], li.labels)
    ms = g.attrs["ome"]["multiscales"][0]
    assert ms["datasets"][0]["coordinateTransformations"][0]["scale"] == [64.0, 64.0]
    from napari_protodiff.core.errors import ProtodiffError

    with pytest.raises(ProtodiffError, match=r"\.tif/\.tiff .* or \.zarr"):
        export_prototype_map(fitted_small, sid, tmp_path / "m.jpg")


def test_overlay_background_paints_the_stored_patches_when_the_slide_is_gone(fitted_small, tmp_path):
    """Without the slide file, each stored patch (read a shard at a time) is painted,
    downscaled, into its place."""
    import shutil

    from PIL import Image

    from napari_protodiff.core.prototype_map import overlay_background

    moved = tmp_path / "moved.zarr"
    shutil.copytree(fitted_small, moved)
    st = PatchStore(moved, mode="r+")
    sid = st.slide_ids[1]
    g = st.slide(sid).group
    g.attrs["protodiff"] = dict(g.attrs["protodiff"], path=str(tmp_path / "no-such-slide.svs"))
    entry = st.slide(sid)
    canvas, ds = overlay_background(st, sid, max_side=400)
    side = max(1, int(round(float(entry.attrs["footprint_level0"]) / ds)))
    pats = entry.patches().compute()
    for i in (0, entry.n_patches // 2, entry.n_patches - 1):
        x, y = entry.coords()[i]
        want = np.asarray(Image.fromarray(pats[i]).resize((side, side), Image.Resampling.BILINEAR))
        y0, x0 = int(y / ds), int(x / ds)
        got = canvas[y0 : y0 + side, x0 : x0 + side]
        np.testing.assert_array_equal(got, want[: got.shape[0], : got.shape[1]])


@pytest.fixture(scope="module")
def fitted_small(embedded_store, tmp_path_factory):
    import shutil

    from napari_protodiff.core.progress import drain
    from napari_protodiff.core.prototypes import PrototypeConfig, fit_prototypes

    p = tmp_path_factory.mktemp("maps") / "maps.zarr"
    shutil.copytree(embedded_store, p)
    drain(fit_prototypes(p, PrototypeConfig(k=3)))
    return p
