"""Layer data of the Synthesize widget: what a model folder offers, and sampled patches as image layers.

No Qt here and no numerics of the method (sampling and the nearest-real search are the
core's: :func:`~napari_protodiff.core.diffusion.synthesize.sample_images`,
:func:`~napari_protodiff.core.diffusion.fidelity.nearest_real_patches`). The patches become
an image layer, a stack ``(n, S, S, 3)`` or a grid mosaic, in µm at the model's patch
pixel size; with the nearest real patches, a second layer of the same layout is shifted
one patch (plus a gap) to the right, so each real patch sits beside its synthetic one.
Per-patch facts (requested prototype, seed, guidance; nearest patch's slide, index,
distance) are lists in the layers' metadata, in patch order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .overlays import OVERLAY_KEY

#: ``metadata[OVERLAY_KEY]`` of the synthetic patches and of their nearest real patches.
SYNTHETIC, NEAREST = "synthetic", "synthetic-nearest-real"
LAYOUTS = ("stack", "grid")


@dataclass(frozen=True)
class ModelInfo:
    """What the widget shows of a model folder before loading any weights (from ``protodiff.json``)."""

    path: str
    k: int
    counts: tuple[int, ...]
    """Training patches per prototype (empty if the folder does not say)."""
    colors: np.ndarray = field(compare=False)
    store: str | None
    class_conditional: bool
    has_classifier: bool
    image_size: int
    patch_mpp: float
    model_hash: str

    def describe(self) -> str:
        parts = [f"{self.k} prototypes, {self.image_size}-px patches at {self.patch_mpp:g} µm/px"]
        parts.append("classifier guidance" if self.has_classifier else "no classifier (guidance 0 only)")
        if self.class_conditional:
            parts.append("classifier-free conditioning")
        return "; ".join(parts) + "."


def model_info(model_dir: str | Path) -> ModelInfo:
    """Read a model folder's description (raises the core's one-sentence ``ModelError``)."""
    from ..core.diffusion.bundle import read_meta
    from ..core.diffusion.errors import ModelError
    from ..core.prototype_map import palette

    root = Path(model_dir).expanduser()
    meta = read_meta(root)
    k = int(meta.get("num_prototypes") or 0)
    if k < 1:
        raise ModelError(f"{root}: the model knows no prototypes (num_prototypes is missing).")
    cfg = meta.get("config") or {}
    counts = tuple(int(c) for c in (meta.get("metrics") or {}).get("prototype_counts") or ())
    return ModelInfo(path=str(root), k=k, counts=counts if len(counts) == k else (), colors=palette(k),
                     store=meta.get("store"), class_conditional=bool((cfg.get("unet") or {}).get("class_conditional")),
                     has_classifier=(root / "classifier").is_dir(), image_size=int(meta.get("image_size") or 32),
                     patch_mpp=float(meta.get("patch_mpp") or 1.0), model_hash=str(meta.get("model_hash")))


def prototype_spec(mode: str, checked: list[int], weights: dict[int, float] | None = None) -> str:
    """``SampleConfig.prototypes`` for a mode (``one``, ``mixture``, ``balanced``), the ticked prototypes and
    (for a mixture) their relative weights (default: equal), normalised to sum to 1."""
    from ..core.errors import ProtodiffError

    if mode == "balanced":
        return "balanced"
    if not checked:
        raise ProtodiffError("Tick at least one prototype (or choose the balanced mode).")
    if mode == "mixture":
        w = {j: float((weights or {}).get(j, 1.0)) for j in checked}
        total = sum(w.values())
        if not total > 0:
            raise ProtodiffError("The mixture's weights are all zero: give at least one ticked prototype a weight.")
        return ",".join(f"{j}:{w[j] / total:.6g}" for j in checked if w[j] > 0)
    return ",".join(str(j) for j in checked)


@dataclass
class Synthesis:
    """A finished sampling job: the images and everything needed to describe them."""

    model_dir: str
    meta: dict[str, Any]
    config: Any
    """The :class:`~napari_protodiff.core.diffusion.config.SampleConfig` used."""
    images: np.ndarray
    """(n, S, S, 3) uint8."""
    requested: np.ndarray
    """(n,) requested prototype per patch (-1: a mixture)."""
    pipe: Any = None
    nearest: dict[str, Any] | None = None
    nearest_error: str | None = None


def grid_columns(n: int) -> int:
    return max(1, math.ceil(math.sqrt(n)))


def _mosaic(images: np.ndarray, cols: int, pitch: tuple[int, int], gap: int) -> tuple[np.ndarray, list]:
    """RGBA mosaic (transparent between patches) and each patch's top-left (y, x) in pixels."""
    n, s = len(images), images.shape[1]
    rows = math.ceil(n / cols)
    out = np.zeros((rows * pitch[0] - gap, cols * pitch[1] - gap, 4), np.uint8)
    origins = []
    for i, img in enumerate(images):
        y, x = (i // cols) * pitch[0], (i % cols) * pitch[1]
        out[y:y + s, x:x + s, :3] = img
        out[y:y + s, x:x + s, 3] = 255
        origins.append((y, x))
    return out, origins


def synthesis_layers(syn: Synthesis, layout: str = "stack", name: str | None = None) -> list[tuple]:
    """``[(data, kwargs, "image")]``: the synthetic patches, then (if found) their nearest real patches."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout '{layout}'; choose one of {', '.join(LAYOUTS)}")
    cfg = syn.config
    n, s = syn.images.shape[:2]
    mpp = float(syn.meta.get("patch_mpp") or 1.0)
    gap = max(2, s // 8)
    beside = syn.nearest is not None
    shift = (s + gap) * mpp  # the nearest real patch, one patch and a gap to the right
    seeds = [int(cfg.seed + i) for i in range(n)]
    md: dict[str, Any] = {
        OVERLAY_KEY: SYNTHETIC, "model_dir": syn.model_dir, "model_hash": syn.meta.get("model_hash"),
        "layout": layout, "n": int(n), "patch_size": int(s), "patch_mpp": mpp,
        "prototype": [int(p) for p in syn.requested], "seed": seeds, "guidance": [float(cfg.guidance)] * n,
        "cfg_scale": cfg.cfg_scale, "prototypes": cfg.prototypes, "scheduler": cfg.scheduler, "steps": cfg.steps,
        "sample_config": cfg.model_dump(),
    }
    if layout == "stack":
        data = syn.images
        scale, translate, units = (1.0, mpp, mpp), (0.0, 0.0, 0.0), ("pixel", "µm", "µm")
        md["origin"] = [(0, 0)] * n
        real = syn.nearest["patches"] if beside else None
        real_translate = (0.0, 0.0, shift)
    else:
        cols = grid_columns(n)
        pitch = (s + gap, (2 * s + 3 * gap) if beside else (s + gap))
        data, origins = _mosaic(syn.images, cols, pitch, gap)
        scale, translate, units = (mpp, mpp), (0.0, 0.0), ("µm", "µm")
        md["origin"] = origins
        real = _mosaic(syn.nearest["patches"], cols, pitch, gap)[0] if beside else None
        real_translate = (0.0, shift)
    title = name or _title(cfg)
    layers = [(data, dict(name=title, scale=scale, translate=translate, units=units, metadata=md, rgb=True), "image")]
    if beside:
        nn = syn.nearest
        md_real = {OVERLAY_KEY: NEAREST, "store": nn["store"], "layout": layout, "n": int(n),
                   "index": [int(v) for v in nn["index"]], "slide_id": list(nn["slide_id"]),
                   "patch": [int(v) for v in nn["patch"]], "coords": [tuple(int(c) for c in xy) for xy in nn["coords"]],
                   "distance": [float(v) for v in nn["distance"]], "near_copy": [bool(v) for v in nn["near_copy"]],
                   "near_copy_threshold": float(nn["threshold"]), "origin": md["origin"]}
        layers.append((real, dict(name=f"{title}: nearest real", scale=scale, translate=real_translate, units=units,
                                  metadata=md_real, rgb=True), "image"))
    return layers


def _title(cfg) -> str:
    what = "balanced" if cfg.prototypes in ("balanced", "all") else f"prototypes {cfg.prototypes}"
    mode = f"s={cfg.guidance:g}" + (f", cfg={cfg.cfg_scale:g}" if cfg.cfg_scale is not None else "")
    return f"synthetic ({what}; {mode}; seed {cfg.seed})"
