"""ABMIL attention maps as napari layers, aligned with a slide layer like the prototype overlay.

``protodiff evaluate mil`` saves each slide's attention per patch with the patches'
level-0 coordinates (``outputs/attention.zarr``). Here one slide's map becomes an Image
layer with one pixel per patch cell: pixel ``(r, c)`` covers level-0 pixels
``origin + (c, r) * footprint``, so with the slide layer's scale ``s`` and translate ``t``
it gets scale ``footprint * s`` and translate ``t + (origin + (footprint - 1) / 2) * s``
(napari puts pixel centres at integer coordinates). Values are attention times the
number of patches (1 = average attention); cells without a patch are transparent (NaN).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .overlays import OVERLAY_KEY, aligned


def attention_layer_data(run: str | Path, slide: str, slide_layer=None, scale=(1.0, 1.0), translate=(0.0, 0.0),
                         units: Any = None) -> tuple[np.ndarray, dict[str, Any], str]:
    """(data, kwargs, "image") of ``slide``'s attention map from an evaluation run (or its attention.zarr).

    ``slide`` is the slide's id, path or file name. The layer is aligned with
    ``slide_layer`` (a level-0 slide layer from this plugin's reader) when given,
    otherwise with ``scale`` / ``translate`` of level-0 pixels.
    """
    from ..core.evaluation.attention import attention_grid, read_attention

    m = read_attention(run, slide=slide)[0]
    grid, (x0, y0) = attention_grid(m)
    if slide_layer is not None:
        scale, translate, units = slide_layer.scale[-2:], slide_layer.translate[-2:], slide_layer.units[-2:]
        name = f"{slide_layer.name} attention"
    else:
        name = f"{m.slide_id} attention"
    s = np.asarray(scale, float)
    t = np.asarray(translate, float) + np.array([y0, x0], float) * s
    sc, tr = aligned(m.footprint, s, t)
    finite = grid[np.isfinite(grid)]
    hi = float(np.quantile(finite, 0.99)) if finite.size else 1.0
    kwargs = {
        "name": name,
        "scale": sc,
        "translate": tr,
        "colormap": "inferno",
        "opacity": 0.55,
        "blending": "translucent",
        "contrast_limits": (0.0, max(hi, 1e-6)),
        "metadata": {OVERLAY_KEY: "attention", "slide_id": m.slide_id, "run": str(run),
                     "footprint": m.footprint, "origin_level0": (x0, y0), **m.attrs},
    }
    if units is not None:
        kwargs["units"] = units
    return grid, kwargs, "image"


def add_attention_layer(viewer, run: str | Path, slide: str, slide_layer=None):
    """Add ``slide``'s attention map over ``slide_layer`` (or the layer whose source is that slide) in ``viewer``."""
    if slide_layer is None:
        for layer in viewer.layers:
            src = getattr(getattr(layer, "source", None), "path", None) or layer.metadata.get("path")
            if src and Path(str(src)).name == Path(slide).name:
                slide_layer = layer
                break
    data, kwargs, _ = attention_layer_data(run, slide, slide_layer)
    return viewer.add_image(data, **kwargs)
