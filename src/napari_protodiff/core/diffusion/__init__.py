"""Latent diffusion guided by histological prototypes (training, sampling, quality).

Submodules import torch and diffusers; this package itself imports nothing heavy, so
``import napari_protodiff.core.diffusion`` stays cheap. Main entry points:

* :func:`.fit.train_diffusion` - train autoencoder, UNet and classifier on a patch store;
* :class:`.pipeline.PrototypeGuidedPipeline` - the diffusers pipeline (``from_pretrained``);
* :func:`.synthesize.synthesize` - sample at scale into a synthetic patch store;
* :func:`.fidelity.evaluate_fidelity` - hit rate, Fréchet distance, PRDC, memorisation audit.
"""

from __future__ import annotations

from ..llvm_guard import install as _install_llvm_guard
from .config import DiffusionConfig, SampleConfig

__all__ = ["DiffusionConfig", "SampleConfig"]

_install_llvm_guard()  # diffusers imports torch._dynamo, which imports triton: not beside Mesa's LLVM
