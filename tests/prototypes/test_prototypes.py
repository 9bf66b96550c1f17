"""Prototypes: the specimen-recovery proof, determinism, overwrite rules, outputs, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from napari_protodiff.core.embedding import GROUP as EMB
from napari_protodiff.core.errors import ProtodiffError, StoreError
from napari_protodiff.core.progress import drain
from napari_protodiff.core.prototypes import (
    PrototypeConfig,
    choose_k,
    exemplar_patches,
    fit_prototypes,
    load_prototypes,
    prototype_status,
    prototype_table,
    slide_assignments,
    write_table,
)
from napari_protodiff.core.store import PatchStore


@pytest.fixture(scope="module")
def fitted(embedded_store, tmp_path_factory):
    import shutil

    p = tmp_path_factory.mktemp("fitted") / "fitted.zarr"
    shutil.copytree(embedded_store, p)
    result = drain(fit_prototypes(p, PrototypeConfig(k=2, seed=7)))
    return p, result


def _labels(path):
    st = PatchStore(path)
    return np.concatenate([slide_assignments(st, s)[0] for s in st.slide_ids])


def test_k2_recovers_the_specimen_of_origin(fitted):
    from sklearn.metrics import adjusted_rand_score

    path, result = fitted
    st = PatchStore(path)
    truth = np.concatenate([np.full(e.n_patches, i) for i, e in enumerate(st.slides())])
    ari = adjusted_rand_score(truth, _labels(path))
    assert ari >= 0.8, ari
    assert sum(result.sizes) == len(truth) and result.k == 2


def test_same_seed_gives_identical_assignments(fitted, store_copy):
    path, result = fitted
    p = store_copy(path)
    again = drain(fit_prototypes(p, PrototypeConfig(k=2, seed=7, overwrite=True)))
    assert np.array_equal(_labels(p), _labels(path))
    assert np.array_equal(load_prototypes(p).centroids, load_prototypes(path).centroids)
    assert again.inertia == result.inertia


def test_existing_prototypes_need_overwrite(fitted):
    path, _ = fitted
    before = load_prototypes(path).attrs["fit_id"]
    with pytest.raises(StoreError, match=r"already has prototypes \(k = 2, encoder 'builtin'\); pass --overwrite"):
        drain(fit_prototypes(path, PrototypeConfig(k=3)))
    assert load_prototypes(path).attrs["fit_id"] == before


def test_saved_set_is_consistent_and_reassigns_new_patches(fitted):
    path, _ = fitted
    st = PatchStore(path)
    p = load_prototypes(st)
    assert p.encoder["name"] == "builtin" and p.encoder_key == "builtin" and p.k == 2
    assert p.attrs["normalize"] == "standardize" and p.attrs["seed"] == 7 and p.attrs["status"] == "complete"
    assert np.allclose(p.shares.sum(1), 1) and p.sizes.sum() == sum(e.n_patches for e in st.slides())
    for sid in st.slide_ids:
        labels, mem = slide_assignments(st, sid)
        assert mem.shape == (len(labels), 2) and np.allclose(mem.sum(1), 1, atol=1e-5)
        assert np.array_equal(mem.argmax(1), labels)
        # "new" patches (here: the slide's own, re-encoded) land on the same prototypes
        pats = st.slide(sid).patches()[:12].compute()
        new_labels, new_mem = p.assign_patches(pats, device="cpu")
        assert np.array_equal(new_labels, labels[:12]) and np.allclose(new_mem, mem[:12], atol=1e-5)
    rows = exemplar_patches(st, 4)
    for j, r in enumerate(rows):
        assert 0 < len(r) <= 4 and r.dtype == np.uint8
        s, i = p.exemplar_slide[j, 0], p.exemplar_patch[j, 0]
        assert slide_assignments(st, p.slides[s])[0][i] == j


def test_table_csv_and_parquet(fitted, tmp_path):
    path, _ = fitted
    t = prototype_table(path)
    n = len(t["slide_id"])
    assert set(t) == {"slide_id", "patch", "x", "y", "prototype", "membership"} and n > 100
    csv = write_table(path, tmp_path / "t.csv")
    lines = csv.read_text().splitlines()
    assert lines[0] == "slide_id,patch,x,y,prototype,membership" and len(lines) == n + 1
    pq = pytest.importorskip("pyarrow.parquet")
    tab = pq.read_table(write_table(path, tmp_path / "t.parquet"))
    assert tab.num_rows == n and tab.column_names[:4] == ["slide_id", "patch", "x", "y"]
    with pytest.raises(ProtodiffError, match=r"\.csv or \.parquet"):
        write_table(path, tmp_path / "t.xlsx")


def test_choose_k(embedded_store):
    rows = drain(choose_k(embedded_store, [2, 3, 4]))
    assert [r["k"] for r in rows] == [2, 3, 4]
    inertias = [r["inertia"] for r in rows]
    assert inertias == sorted(inertias, reverse=True)
    assert all(-1 <= r["silhouette"] <= 1 for r in rows)


def test_bad_input(two_specimen_store, embedded_store, store_copy, tmp_path):
    empty = PatchStore.create(tmp_path / "empty.zarr", 64, 1.0)
    with pytest.raises(StoreError, match="no completely tiled slide"):
        drain(fit_prototypes(empty.path, PrototypeConfig(k=2)))
    with pytest.raises(StoreError, match="no complete embeddings; run protodiff embed first"):
        drain(fit_prototypes(two_specimen_store, PrototypeConfig(k=2)))
    with pytest.raises(ProtodiffError, match=r"k = 1000 is larger than the number of patches .* \(144\)"):
        drain(fit_prototypes(embedded_store, PrototypeConfig(k=1000)))
    with pytest.raises(StoreError, match="no complete embeddings from encoder 'uni'"):
        drain(fit_prototypes(embedded_store, PrototypeConfig(k=2, encoder="uni")))
    assert prototype_status(PatchStore(embedded_store)) is None
    # NaN / infinite embeddings: named, and nothing is written
    p = store_copy(embedded_store)
    st = PatchStore(p, mode="r+")
    sid = st.slide_ids[1]
    vec = st.slide(sid).group[EMB]["builtin"]["vectors"]
    v = np.asarray(vec[:])
    v[3, 5], v[10, 0] = np.nan, np.inf
    vec[:] = v
    with pytest.raises(ProtodiffError, match=rf"embeddings of slide '{sid}' .* NaN or infinite values in 2 row"):
        drain(fit_prototypes(p, PrototypeConfig(k=2)))
    assert prototype_status(PatchStore(p)) is None
    with pytest.raises(StoreError, match="no prototypes; run protodiff prototypes first"):
        load_prototypes(p)


def test_interrupted_fit_is_not_complete(embedded_store, store_copy):
    p = store_copy(embedded_store)
    gen = fit_prototypes(p, PrototypeConfig(k=2))
    for ev in gen:
        if ev.message.startswith("writing"):
            break
    gen.close()
    assert prototype_status(PatchStore(p)) in (None, "fitting")
    with pytest.raises(StoreError):
        load_prototypes(p)
    drain(fit_prototypes(p, PrototypeConfig(k=2)))  # no --overwrite needed: nothing complete was there
    assert prototype_status(PatchStore(p)) == "complete"
