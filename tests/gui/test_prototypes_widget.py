"""The Prototypes widget: embed + cluster in the background, a prototype map aligned with the slide in µm,
legend, gallery, show/hide, cancel, errors."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from napari_protodiff.core.store import PatchStore

pytestmark = pytest.mark.gui

WAIT = 120_000  # ms: embedding and k-means on a CPU shared with other jobs


def _tiled(tmp_path_factory, cmu_svs, name, **params):
    from napari_protodiff.core.progress import drain
    from napari_protodiff.core.tiling import TilingConfig, tile_slides

    out = tmp_path_factory.mktemp("protos") / f"{name}.zarr"
    drain(tile_slides([cmu_svs], out, TilingConfig(**params)))
    return out


@pytest.fixture(scope="module")
def tiled_store(tmp_path_factory, cmu_svs):
    """128-px patches at 0.5 µm/px: read from level 0 without resampling, footprint 128 level-0 px."""
    return _tiled(tmp_path_factory, cmu_svs, "integer", size=128, mpp=0.5, workers=1)


@pytest.fixture(scope="module")
def resampled_store(tmp_path_factory, cmu_svs):
    """64-px patches at 1 µm/px of a 0.499 µm/px slide: 128 level-0 px read and resized to 64 (resampled)."""
    return _tiled(tmp_path_factory, cmu_svs, "resampled", size=64, mpp=1.0, workers=1)


@pytest.fixture
def store(tiled_store, tmp_path):
    """A fresh copy (the widget writes embeddings and prototypes into it)."""
    return shutil.copytree(tiled_store, tmp_path / "patches.zarr")


@pytest.fixture
def widget(make_napari_viewer, qtbot):
    """The widget docked from the plugin's contribution (with napari's public-only viewer proxy)."""
    from napari_protodiff._napari.prototypes_widget import PrototypesWidget

    viewer = make_napari_viewer()
    _, w = viewer.window.add_plugin_dock_widget("napari-protodiff", "Prototypes")
    assert isinstance(w, PrototypesWidget)
    yield w
    w.cancel()
    qtbot.waitUntil(lambda: not w.busy, timeout=WAIT)


def _run(w, qtbot, store, k=3, **params):
    w.set_store(store)
    w.proto_form.set_values(k=k, restarts=1, **params)
    w.run()
    assert w.busy and w.cancel_button.isEnabled() and not w.run_button.isEnabled()
    qtbot.waitUntil(lambda: not w.busy, timeout=WAIT)


def _stored(store):
    from napari_protodiff.core.prototypes import slide_assignments

    st = PatchStore(store)
    [entry] = st.slides()
    labels, _ = slide_assignments(st, entry.slide_id)
    return entry, labels


def _check_geometry(slide, protos, entry, labels, exact: bool):
    """Every patch's cell in the map covers the patch's level-0 footprint in the world, and its label is right."""
    fp = float(entry.attrs["footprint_level0"])
    coords = entry.coords()
    n = len(coords)
    for i in sorted({0, 1, n // 3, n // 2, n - 2, n - 1}):
        x, y = (int(v) for v in coords[i])
        r, c = round(y / fp), round(x / fp)
        # The cell's world corners (napari: pixel i spans data [i - 0.5, i + 0.5]).
        cell0 = np.asarray(protos.data_to_world((r - 0.5, c - 0.5)))
        cell1 = np.asarray(protos.data_to_world((r + 0.5, c + 0.5)))
        # The patch footprint's corners on the slide: level-0 pixel edges x - 0.5 and x + fp - 0.5.
        foot0 = np.asarray(slide.data_to_world((y - 0.5, x - 0.5)))
        foot1 = np.asarray(slide.data_to_world((y + fp - 0.5, x + fp - 0.5)))
        # Resampled stores keep integer corners round(c * fp) of cells c * fp: at most half a level-0 pixel apart.
        tol = 1e-6 if exact else 0.5 * float(slide.scale[0]) + 1e-6
        assert np.allclose(cell0, foot0, atol=tol, rtol=0), (i, cell0, foot0)
        assert np.allclose(cell1, foot1, atol=tol, rtol=0), (i, cell1, foot1)
        # And the cell's edges are exactly the slide's level-0 edges at c * fp.
        assert np.allclose(cell0, slide.data_to_world((r * fp - 0.5, c * fp - 0.5)), atol=1e-6, rtol=0)
        centre = slide.data_to_world((y + fp / 2 - 0.5, x + fp / 2 - 0.5))
        assert protos.get_value(centre, world=True) == labels[i] + 1, i
    # Everywhere: the map holds each patch's prototype + 1 and 0 elsewhere.
    r = np.round(coords[:, 1] / fp).astype(int)
    c = np.round(coords[:, 0] / fp).astype(int)
    assert np.array_equal(protos.data[r, c], labels + 1)
    assert np.count_nonzero(protos.data) == n


def test_embed_cluster_and_map_aligned_with_the_slide(widget, store, cmu_svs, qtbot, notes):
    w = widget
    slide = w.viewer.open(str(cmu_svs), plugin="napari-protodiff")[0]  # already open: the map aligns to it
    _run(w, qtbot, store)
    assert not any("ERROR" in s for s, _ in notes())
    embedded, fitted = w.last_result
    entry, labels = _stored(store)
    assert embedded.patches_embedded == entry.n_patches > 50 and fitted.k == 3
    assert "3 prototypes" in w.status_label.text() and "Embedded" in w.status_label.text()

    protos = w.prototypes_layer
    assert protos is not None and len(w.viewer.layers) == 2  # no second copy of the slide
    assert protos.metadata["slide_path"] == slide.metadata["path"]
    counts = np.bincount(labels, minlength=3)
    assert [int(np.count_nonzero(protos.data == j + 1)) for j in range(3)] == counts.tolist()
    f = protos.features
    assert list(f["prototype"]) == [0, 1, 2] and list(f["index"]) == [1, 2, 3]
    assert list(f["count"]) == counts.tolist() and np.allclose(f["share"], counts / counts.sum())
    assert [str(u) for u in protos.units] == ["micrometer", "micrometer"]
    assert tuple(protos.scale) == pytest.approx((128 * slide.scale[0],) * 2)

    _check_geometry(slide, protos, entry, labels, exact=True)

    # A distinct opaque colour per prototype, transparent background.
    cols = [tuple(protos.colormap.map(np.array([j + 1]))[0]) for j in range(3)]
    assert len(set(cols)) == 3 and all(c[3] == 1 for c in cols)
    assert protos.colormap.map(np.array([0]))[0][3] == 0

    # Legend: one row per prototype with this slide's counts and shares.
    assert w.legend.rowCount() == 3
    for j in range(3):
        assert w.legend.item(j, 0).text() == f"prototype {j}"
        assert w.legend.item(j, 1).text() == f"{counts[j]:,}"
        assert w.legend.item(j, 2).text() == f"{counts[j] / counts.sum():.1%}"
    # The status bar shows a label's features.
    x, y = entry.coords()[0]
    status = protos.get_status(slide.data_to_world((y + 64, x + 64)), world=True)
    assert f"prototype: {labels[0]}" in status["value"] and f"count: {counts[labels[0]]}" in status["value"]


def test_opens_the_slide_when_not_open_and_aligns_on_a_resampled_store(widget, resampled_store, tmp_path, qtbot):
    w = widget
    store = shutil.copytree(resampled_store, tmp_path / "resampled.zarr")
    _run(w, qtbot, store)
    entry, labels = _stored(store)
    fp = entry.attrs["footprint_level0"]
    assert entry.attrs["resampled"] and entry.attrs["read_size"] != entry.attrs["patch_size"]
    slides = [ly for ly in w.viewer.layers if ly.metadata.get("protodiff_slide")]
    assert len(slides) == 1 and slides[0].name == "CMU-1-Small-Region.svs"  # opened with the reader
    protos = w.prototypes_layer
    assert tuple(protos.scale) == pytest.approx((fp * slides[0].scale[0],) * 2)
    _check_geometry(slides[0], protos, entry, labels, exact=False)


def test_picking_shows_exemplars_and_hiding_works(widget, store, qtbot):
    from napari_protodiff.core.prototypes import load_prototypes

    w = widget
    _run(w, qtbot, store)
    protos = w.prototypes_layer
    st = PatchStore(store)
    p = load_prototypes(st)

    def check_gallery(j):
        [g] = [ly for ly in w.viewer.layers if ly.metadata.get("protodiff_overlay") == "prototype-gallery"]
        md = g.metadata
        assert md["prototype"] == j and g.rgb and g.data.dtype == np.uint8
        want = [(p.slides[si], int(pi)) for si, pi in zip(p.exemplar_slide[j], p.exemplar_patch[j]) if si >= 0]
        assert [tuple(e) for e in md["exemplars"]] == want and len(want) >= 1
        s = st.patch_size
        for (sid, pi), (y, x) in zip(want, md["origins"]):
            assert np.array_equal(np.asarray(g.data)[y:y + s, x:x + s], st.slide(sid).group["patches"][pi])
        # Beside the slide, not over it.
        assert g.data_to_world((0, 0))[1] > protos.data_to_world((0, protos.data.shape[1]))[1]
        return g

    w.legend.selectRow(1)  # as a user clicking the row
    assert w.picked == 1 and protos.selected_label == 2
    g = check_gallery(1)

    # Clicking the map picks the prototype under the cursor; the gallery is replaced in place.
    entry, labels = _stored(store)
    i = int(np.flatnonzero(labels == 2)[0])
    x, y = entry.coords()[i]
    fp = entry.attrs["footprint_level0"]
    world = protos.data_to_world((round(y / fp), round(x / fp)))
    assert w.pick_at(world) == 2 and w.picked == 2
    assert check_gallery(2).unique_id == g.unique_id
    assert {i.row() for i in w.legend.selectedIndexes()} == {2}

    # A real mouse click on the map, through napari's mouse callbacks.
    from napari.utils.interactions import mouse_press_callbacks, mouse_release_callbacks

    i = int(np.flatnonzero(labels == 0)[0])
    x, y = entry.coords()[i]
    world = protos.data_to_world((round(y / fp), round(x / fp)))
    ev = _MouseEvent("mouse_press", world)
    mouse_press_callbacks(protos, ev)
    mouse_release_callbacks(protos, _MouseEvent("mouse_release", world))
    assert w.picked == 0
    check_gallery(0)
    # The picker tool of the layer (selected_label) picks too.
    protos.selected_label = 2
    assert w.picked == 1

    # Hiding: unticked prototypes become transparent, the others keep their colour.
    from qtpy.QtCore import Qt

    before = protos.colormap.map(np.array([1, 2, 3]))
    w.legend.item(1, 0).setCheckState(Qt.CheckState.Unchecked)
    assert w.hidden == [1]
    after = protos.colormap.map(np.array([1, 2, 3]))
    assert after[1][3] == 0 and np.allclose(after[[0, 2]], before[[0, 2]])
    w.set_hidden([0, 2])
    assert w.hidden == [0, 2]
    after = protos.colormap.map(np.array([1, 2, 3]))
    assert after[0][3] == after[2][3] == 0 and after[1][3] == 1
    w.set_hidden(())
    assert np.allclose(protos.colormap.map(np.array([1, 2, 3])), before)


class _MouseEvent:
    """The fields napari's layer mouse callbacks read."""

    def __init__(self, type_, position):
        self.type = type_
        self.position = tuple(position)
        self.button = 1
        self.modifiers = ()
        self.handled = False
        self.dims_displayed = [0, 1]
        self.view_direction = None


def test_existing_prototypes_show_without_refitting_and_replace_needs_overwrite(widget, store, qtbot, notes):
    w = widget
    _run(w, qtbot, store)
    fit_id = w.prototypes_layer.metadata["fit_id"]
    ids = [ly.unique_id for ly in w.viewer.layers]
    w.run()  # same store again: embeddings are reused, but the prototypes need "overwrite"
    qtbot.waitUntil(lambda: not w.busy, timeout=WAIT)
    errors = [m for s, m in notes() if "ERROR" in s]
    assert len(errors) == 1 and "already has prototypes" in errors[0] and "overwrite" in errors[0]
    w.proto_form.set_values(overwrite=True, k=4)
    w.run()
    qtbot.waitUntil(lambda: not w.busy, timeout=WAIT)
    embedded, fitted = w.last_result
    assert embedded is None and fitted.k == 4 and "already in the store" in w.status_label.text()
    layer = w.prototypes_layer
    assert [ly.unique_id for ly in w.viewer.layers] == ids  # updated in place
    assert layer.metadata["fit_id"] != fit_id and w.legend.rowCount() == 4 and layer.data.max() == 4
    assert w.show_prototypes().unique_id == layer.unique_id

    # Closing the map empties the legend.
    w.viewer.layers.remove(layer)
    assert w.prototypes_layer is None and w.legend.rowCount() == 0 and w.pick(0) is None

    # The slide file is gone: a warning, and the map is drawn in the store's µm without the slide.
    st = PatchStore(store, mode="r+")
    [entry] = st.slides()
    entry.group.attrs["protodiff"] = dict(entry.attrs, path=str(store.parent / "moved-away.svs"))
    w.refresh_store()
    for ly in list(w.viewer.layers):
        w.viewer.layers.remove(ly)
    layer = w.show_prototypes()
    assert any("WARNING" in s and "moved-away.svs" in m for s, m in notes())
    assert [ly.unique_id for ly in w.viewer.layers] == [layer.unique_id] and w.legend.rowCount() == 4
    fp, mpp = entry.attrs["footprint_level0"], entry.attrs["slide_mpp"]
    assert tuple(layer.scale) == pytest.approx((fp * mpp,) * 2)
    assert layer.data_to_world((-0.5, -0.5)) == pytest.approx((-0.5 * mpp, -0.5 * mpp))


def test_cancel_leaves_no_prototypes_marked_complete(widget, store, qtbot, notes):
    from napari_protodiff.core.prototypes import prototype_status

    w = widget
    w.set_store(store)
    w.run()
    w.cancel()
    assert not w.cancel_button.isEnabled() and "Cancelling" in w.status_label.text()
    qtbot.waitUntil(lambda: not w.busy, timeout=WAIT)
    assert w.last_result is None and w.prototypes_layer is None
    assert prototype_status(PatchStore(store)) != "complete"
    assert any("INFO" in s and "Cancelled" in m for s, m in notes())
    assert w.run_button.isEnabled() and not w.cancel_button.isEnabled()


def test_bad_input_is_a_notification(widget, tmp_path, qtbot, notes):
    w = widget
    w.run()  # no store
    w.set_store(tmp_path / "nowhere.zarr")
    assert "not a patch store" in w.store_label.text() and w.slide_combo.count() == 0
    w.run()  # a folder that is not a store: the core refuses it in the worker
    qtbot.waitUntil(lambda: not w.busy, timeout=WAIT)
    empty = PatchStore.create(tmp_path / "empty.zarr", patch_size=64, mpp=1.0).path
    w.set_store(empty)
    w.run()  # a store without patches
    qtbot.waitUntil(lambda: not w.busy, timeout=WAIT)
    w.show_prototypes()  # nothing to show
    w.encoder_combo.setCurrentText("uni")
    w.run()  # a named encoder without its weights
    qtbot.waitUntil(lambda: not w.busy, timeout=WAIT)
    errors = [m for s, m in notes() if "ERROR" in s]
    assert len(errors) == 5, errors
    assert "Choose a patch store" in errors[0]
    assert "nowhere.zarr" in errors[1] and "not a patch store" in errors[1]
    assert "empty.zarr" in errors[2] and "no completely tiled slide" in errors[2]
    assert "empty.zarr" in errors[3]
    assert "uni" in errors[4] and "weights" in errors[4]
    assert all("Traceback" not in m and "\n" not in m for m in errors)
    assert w.prototypes_layer is None and len(w.viewer.layers) == 0
