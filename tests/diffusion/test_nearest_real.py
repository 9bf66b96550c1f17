"""fidelity.nearest_real_patches: each synthetic patch's nearest real patch, over every slide, chunk by chunk."""

from __future__ import annotations

import numpy as np
import pytest

from napari_protodiff.core.diffusion.fidelity import _cdist, _pixels32, nearest_real_patches
from napari_protodiff.core.diffusion.prototypes_adapter import store_patches
from napari_protodiff.core.errors import Cancelled, StoreError
from napari_protodiff.core.progress import CancelToken, drain
from napari_protodiff.core.store import PatchStore


def test_nearest_real_patches_over_all_slides(two_proto_store):
    st = PatchStore(two_proto_store)
    pool = store_patches(st)
    n0 = st.slides()[0].n_patches
    pick = [3, n0 - 1, n0, len(pool) - 1]  # both slides, chunk edges included
    copies = pool[pick]
    rng = np.random.default_rng(0)
    other = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)  # noise: not a copy of anything
    images = np.concatenate([copies, other])
    events = []
    gen = nearest_real_patches(two_proto_store, images, chunk=100)
    try:
        while True:
            events.append(next(gen))
    except StopIteration as stop:
        r = stop.value
    assert len(events) >= len(pool) // 100 and events[-1].step == events[-1].total == len(pool)
    assert r["index"][:4].tolist() == pick and np.allclose(r["distance"][:4], 0, atol=0.05)  # cdist via matmul: ~0.02 off
    assert r["near_copy"].tolist() == [True] * 4 + [False] * 2
    d = _cdist(_pixels32(other), _pixels32(pool))
    assert r["index"][4:].tolist() == d.argmin(1).tolist()
    assert np.array_equal(r["patches"], pool[r["index"]])
    ids = [e.slide_id for e in st.slides()]
    assert r["slide_id"][:4] == [ids[0], ids[0], ids[1], ids[1]] and r["patch"][:4].tolist() == [3, n0 - 1, 0,
                                                                                               len(pool) - n0 - 1]
    assert r["coords"].shape == (6, 2) and 0 < r["threshold"]


def test_nearest_real_patches_cancel_and_missing_store(two_proto_store, tmp_path):
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        drain(nearest_real_patches(two_proto_store, np.zeros((1, 32, 32, 3), np.uint8), cancel=token))
    with pytest.raises(StoreError, match="not available"):
        drain(nearest_real_patches(tmp_path / "gone.zarr", np.zeros((1, 32, 32, 3), np.uint8)))
