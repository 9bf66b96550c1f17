"""Small real patch stores (tiled from the test slides) and a tiny DINO configuration."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("timm")
pytest.importorskip("lightly")


def _tile(slides, out, **kw):
    from napari_protodiff.core.progress import drain
    from napari_protodiff.core.tiling import TilingConfig, tile_slides

    drain(tile_slides(slides, out, TilingConfig(**kw)))
    return out


@pytest.fixture(scope="session")
def real_store(tmp_path_factory, cmu_svs):
    """CMU-1-Small-Region (skin, H&E) as 32-px patches at 1 µm/px (~600 patches)."""
    return _tile([cmu_svs], tmp_path_factory.mktemp("stores") / "real.zarr", size=32, mpp=1.0)


@pytest.fixture(scope="session")
def other_store(tmp_path_factory, he_png):
    """The TIAToolbox H&E region (tumour) as 32-px patches at 1 µm/px: the second ("synthetic") source."""
    return _tile([he_png], tmp_path_factory.mktemp("stores") / "other.zarr", size=32, mpp=1.0, mpp_override=0.5)


@pytest.fixture(scope="session")
def store_48px(tmp_path_factory, he_png):
    return _tile([he_png], tmp_path_factory.mktemp("stores") / "p48.zarr", size=48, mpp=1.0, mpp_override=0.5)


@pytest.fixture(scope="session")
def store_2mpp(tmp_path_factory, he_png):
    return _tile([he_png], tmp_path_factory.mktemp("stores") / "m2.zarr", size=32, mpp=2.0, mpp_override=0.5)


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory):
    from napari_protodiff.core.store import PatchStore

    p = tmp_path_factory.mktemp("stores") / "empty.zarr"
    PatchStore.create(p, 32, 1.0)
    return p


TINY = dict(batch_size=4, images_per_epoch=12, epochs=2, n_local=2, out_dim=256, hidden_dim=128, bottleneck_dim=64,
            workers=0, threads=1, checkpoint_every=100)


@pytest.fixture
def tiny_config(real_store):
    from napari_protodiff.core.ssl import PretrainConfig

    def make(**kw):
        return PretrainConfig(**{"real": [str(real_store)], **TINY, **kw})

    return make
