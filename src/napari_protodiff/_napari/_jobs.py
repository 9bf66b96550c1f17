"""Core jobs as napari thread workers, with the user's errors returned as values.

A :class:`~napari_protodiff.core.errors.ProtodiffError` (bad input) or a cancellation
comes back as an :class:`Outcome` so the widget shows its one sentence as a
notification; anything else is a bug and goes to napari's error handler with its
traceback.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence


@dataclass
class Outcome:
    """What a job ended with: a value, a user error, or a cancellation."""

    value: Any = None
    error: str | None = None
    cancelled: bool = False


def plan_job(frame, config) -> Outcome:
    """Tissue mask and patch grid of the slide in ``frame`` (a :class:`.overlays.SlideFrame`),
    as layer data of the two overlays (built here, off the UI thread)."""
    from ..core.errors import ProtodiffError
    from ..core.tiling import plan_slide
    from .overlays import grid_layer_data, tissue_layer_data

    try:
        slide, mask, grid = plan_slide(frame.path, config)
    except ProtodiffError as exc:
        return Outcome(error=str(exc))
    slide.close()
    return Outcome(value=(mask, grid, [tissue_layer_data(mask, frame), grid_layer_data(grid, frame)]))


def tile_job(paths: Sequence[str | os.PathLike], store: str, config, cancel):
    """``core.tiling.tile_slides`` as a generator of progress events ending in an :class:`Outcome`."""
    from ..core.errors import Cancelled, ProtodiffError
    from ..core.tiling import tile_slides

    try:
        result = yield from tile_slides(paths, store, config, cancel=cancel)
    except Cancelled:
        return Outcome(cancelled=True)
    except ProtodiffError as exc:
        return Outcome(error=str(exc))
    return Outcome(value=result)


def prototypes_job(store: str, embed_config, proto_config, cancel):
    """Embed the store's patches (unless they already are, with this encoder) and fit prototypes on
    them, as one generator of progress events ending in an :class:`Outcome` whose value is
    ``(EmbedResult or None, PrototypeResult)``."""
    from ..core.embedding import embed_store, embedding_keys
    from ..core.encoders import load_encoder
    from ..core.errors import Cancelled, ProtodiffError
    from ..core.progress import Progress
    from ..core.prototypes import fit_prototypes
    from ..core.store import PatchStore

    try:
        st = PatchStore(store)  # a wrong folder fails here, before the encoder loads
        yield Progress(0, 0, "loading the encoder")
        c = embed_config
        enc = load_encoder(c.encoder, arch=c.arch, weights=c.weights, device=c.device,
                           **({"input_size": c.input_size} if c.input_size else {}))
        embedded = None
        if c.overwrite or enc.key not in embedding_keys(st) or not st.slides():
            embedded = yield from embed_store(store, c, cancel=cancel, encoder=enc)
        cancel.raise_if_cancelled()
        fitted = yield from fit_prototypes(store, proto_config.model_copy(update={"encoder": enc.key}), cancel=cancel)
    except Cancelled:
        return Outcome(cancelled=True)
    except ProtodiffError as exc:
        return Outcome(error=str(exc))
    return Outcome(value=(embedded, fitted))


def avoid_llvm_clash() -> bool:
    """Keep torch from importing triton when the process already holds another LLVM (Mesa's software
    OpenGL): see :mod:`napari_protodiff.core.llvm_guard`. Returns whether triton is blocked now."""
    import sys

    from ..core.llvm_guard import install, llvm_loaded

    install()
    return "triton" not in sys.modules and llvm_loaded()


def start(func, *args, **connect):
    """Create a napari worker for ``func(*args)``, connect ``signal=slot`` pairs, start it."""
    from napari.qt.threading import create_worker

    worker = create_worker(func, *args, _start_thread=False)
    for signal, slot in connect.items():
        getattr(worker, signal).connect(slot)
    worker.start()
    return worker


def synthesize_job(model_dir: str, config, cancel, pipe=None, nearest_store: str | None = None):
    """Sample patches in memory (``core.diffusion.synthesize.sample_images``) and, if ``nearest_store``
    is given, find each one's nearest real patch there; a generator of progress events ending in an
    :class:`Outcome` whose value is a :class:`.synthesis_layers.Synthesis`.

    ``pipe``: the pipeline already loaded for ``model_dir`` (reused; loaded here otherwise).
    A missing real store is not an error: the synthetic patches come back with ``nearest_error`` set.
    """
    from ..core.diffusion.bundle import load_bundle, read_meta
    from ..core.diffusion.fidelity import nearest_real_patches
    from ..core.diffusion.synthesize import sample_images
    from ..core.diffusion.training import resolve_device
    from ..core.errors import Cancelled, ProtodiffError
    from ..core.progress import Progress
    from .synthesis_layers import Synthesis

    try:
        meta = read_meta(model_dir)
        if pipe is None or getattr(pipe, "protodiff_meta", {}).get("model_hash") != meta["model_hash"]:
            yield Progress(0, 0, "loading the model")
            pipe = load_bundle(model_dir, device=resolve_device(config.device))
        if config.guidance > 0 and pipe.classifier is None:
            raise ProtodiffError(f"{model_dir}: the model has no prototype classifier; set the guidance scale to 0.")
        images, requested = yield from sample_images(pipe, config, cancel=cancel)
        nearest, nearest_error = None, None
        if nearest_store:
            try:
                nearest = yield from nearest_real_patches(nearest_store, images, cancel=cancel)
            except Cancelled:
                raise
            except ProtodiffError as exc:
                nearest_error = str(exc)
    except Cancelled:
        return Outcome(cancelled=True)
    except ProtodiffError as exc:
        return Outcome(error=str(exc))
    return Outcome(value=Synthesis(model_dir=str(model_dir), meta=meta, config=config, images=images,
                                   requested=requested, pipe=pipe, nearest=nearest, nearest_error=nearest_error))
