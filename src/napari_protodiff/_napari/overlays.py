"""Layers drawn over a slide layer: the tissue mask and the patch grid, aligned in world units.

A coarse layer whose pixel ``i`` covers level-0 pixels ``[i*ds, (i+1)*ds)`` is aligned to
a level-0 slide layer (scale ``s``, translate ``t``) by scale ``ds*s`` and translate
``t + (ds-1)/2*s``: napari puts pixel centres at integer data coordinates, so the
coarse pixel's centre must land on the centre of the level-0 block it covers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

#: Metadata key of an overlay layer: its kind ("tissue" or "patches").
OVERLAY_KEY = "protodiff_overlay"

TISSUE, INK = 1, 2
TISSUE_COLORS = {None: "transparent", 0: "transparent", TISSUE: "#2ee66b", INK: "#2f6bff"}
GRID_COLORS = {None: "transparent", 0: "transparent", 1: "#00d5ff", 2: "#ffd400"}


@dataclass(frozen=True)
class SlideFrame:
    """Where a slide layer sits in the world: what overlays need of it (plain values, thread-safe)."""

    name: str
    path: str
    scale: tuple[float, ...]
    translate: tuple[float, ...]
    units: tuple[Any, ...]

    @classmethod
    def of(cls, layer) -> "SlideFrame":
        return cls(layer.name, layer.metadata["path"], tuple(layer.scale), tuple(layer.translate), tuple(layer.units))


#: Display settings that napari takes only after a layer exists, per overlay kind.
STYLE = {"tissue": {"contour": 1}}  # outlines: the tissue stays visible under the grid


def apply_style(layer) -> None:
    """Apply :data:`STYLE` to an overlay layer made from this module's layer data."""
    for name, value in STYLE.get(layer.metadata.get(OVERLAY_KEY), {}).items():
        setattr(layer, name, value)


def aligned(downsample: float, scale: Sequence[float], translate: Sequence[float]) -> tuple[tuple, tuple]:
    """Scale and translate of a layer ``downsample`` times coarser than a level-0 slide layer."""
    s = np.asarray(scale, float)
    t = np.asarray(translate, float)
    return tuple(s * downsample), tuple(t + (downsample - 1) / 2 * s)


def tissue_layer_data(mask, frame: SlideFrame) -> tuple[np.ndarray, dict[str, Any], str]:
    """Labels layer data of a :class:`~napari_protodiff.core.tissue.TissueMask` (1 tissue, 2 ink)."""
    labels = mask.mask.astype(np.uint8) * TISSUE
    if mask.ink is not None:
        labels[mask.ink & ~mask.mask] = INK
    scale, translate = aligned(mask.downsample, frame.scale, frame.translate)
    kwargs = {
        "name": f"{frame.name} tissue",
        "scale": scale,
        "translate": translate,
        "units": frame.units,
        "opacity": 0.9,
        "colormap": TISSUE_COLORS,
        "metadata": {OVERLAY_KEY: "tissue", "slide_path": frame.path, "downsample": mask.downsample,
                     "mask_mpp": mask.mpp, "tissue_fraction": mask.tissue_fraction},
    }
    return labels, kwargs, "labels"


def grid_layer_data(grid, frame: SlideFrame) -> tuple[np.ndarray, dict[str, Any], str]:
    """Labels layer data of a :class:`~napari_protodiff.core.grid.GridPlan`: one pixel per grid cell.

    Kept cells form a checkerboard (labels 1 and 2 by the parity of row + column) so that
    neighbouring patches stay distinguishable; cells without enough tissue are 0.
    """
    rows, cols = grid.grid_shape
    labels = np.zeros((rows, cols), dtype=np.uint8)
    r, c = grid.grid_index[:, 0], grid.grid_index[:, 1]
    labels[r, c] = 1 + (r + c) % 2
    scale, translate = aligned(grid.footprint, frame.scale, frame.translate)
    kwargs = {
        "name": f"{frame.name} patches",
        "scale": scale,
        "translate": translate,
        "units": frame.units,
        "opacity": 0.4,
        "colormap": GRID_COLORS,
        "metadata": {OVERLAY_KEY: "patches", "slide_path": frame.path, "footprint": grid.footprint,
                     "patch_size": grid.patch_size, "patch_mpp": grid.patch_mpp, "n_patches": grid.n_patches},
    }
    return labels, kwargs, "labels"
