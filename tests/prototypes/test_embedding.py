"""Embedding a store: written in chunks, resumable, never silently replaced, clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from napari_protodiff.core.embedding import (
    EmbedConfig,
    embed_store,
    embedding_attrs,
    embedding_keys,
    read_embeddings,
)
from napari_protodiff.core.errors import StoreError
from napari_protodiff.core.progress import drain
from napari_protodiff.core.store import PatchStore


def test_embeddings_are_complete_and_aligned(embedded_store):
    st = PatchStore(embedded_store)
    assert list(embedding_keys(st)) == ["builtin"]
    for e in st.slides():
        x = read_embeddings(st, e.slide_id, "builtin")
        assert x.shape == (e.n_patches, 79) and np.isfinite(x).all()
        a = embedding_attrs(e, "builtin")
        assert a["status"] == "complete" and a["encoder"]["name"] == "builtin" and a["nonfinite_rows"] == 0
        from napari_protodiff.core.encoders.builtin import BuiltinEncoder

        assert np.array_equal(x[:5], BuiltinEncoder().encode(e.patches()[:5].compute()))


def test_rerun_needs_overwrite(embedded_store, store_copy):
    with pytest.raises(StoreError, match="already has complete embeddings from encoder 'builtin'; pass --overwrite"):
        drain(embed_store(embedded_store))
    p = store_copy(embedded_store)
    st = PatchStore(p)
    before = read_embeddings(st, st.slide_ids[0], "builtin")
    r = drain(embed_store(p, EmbedConfig(overwrite=True, slides=[st.slide_ids[0]])))
    assert [s["action"] for s in r.slides] == ["overwrite"]
    assert np.array_equal(before, read_embeddings(st, st.slide_ids[0], "builtin"))


def test_interrupted_embedding_resumes_to_the_same_result(two_specimen_store, embedded_store, store_copy):
    p = store_copy(two_specimen_store)
    cfg = EmbedConfig(chunk_rows=16, batch_size=8)
    gen = embed_store(p, cfg)
    seen = 0
    for ev in gen:
        if ev.step > 0:
            seen += 1
        if seen == 3:
            break
    gen.close()  # interrupted after three chunks
    st = PatchStore(p)
    first = st.slides()[0]
    a = embedding_attrs(first, "builtin")
    assert a["status"] == "embedding"
    assert embedding_keys(st) == {}
    with pytest.raises(StoreError, match="incomplete"):
        read_embeddings(st, first.slide_id, "builtin")
    r = drain(embed_store(p, cfg))
    assert r.slides[0]["action"] == "resume"
    assert r.patches_embedded == sum(e.n_patches for e in st.slides()) - 3 * 16
    ref = PatchStore(embedded_store)
    for e in st.slides():
        assert np.array_equal(read_embeddings(st, e.slide_id, "builtin"), read_embeddings(ref, e.slide_id, "builtin"))


def test_timm_encoder_embeddings_in_the_store(two_specimen_store, store_copy, tiny_vit_file):
    p = store_copy(two_specimen_store)
    cfg = EmbedConfig(encoder=str(tiny_vit_file), arch="vit_tiny_patch16_224", input_size=32, device="cpu",
                      slides=[PatchStore(p).slide_ids[0]])
    r = drain(embed_store(p, cfg))
    assert r.key.startswith("vit_tiny_patch16_224-") and r.encoder["dim"] == 192
    st = PatchStore(p)
    x = read_embeddings(st, st.slide_ids[0], r.key)
    assert x.shape == (st.slides()[0].n_patches, 192) and np.isfinite(x).all()


def test_empty_store_and_unknown_slide(tmp_path, two_specimen_store):
    empty = PatchStore.create(tmp_path / "empty.zarr", 64, 1.0)
    with pytest.raises(StoreError, match="no completely tiled slide"):
        drain(embed_store(empty.path))
    with pytest.raises(StoreError, match="no slide 'nope' in this store"):
        drain(embed_store(two_specimen_store, EmbedConfig(slides=["nope"])))
    with pytest.raises(StoreError, match="not a patch store"):
        drain(embed_store(tmp_path / "nothing.zarr"))
