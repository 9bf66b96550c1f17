"""The patch grid: where patches of ``size`` px at ``mpp`` µm/px lie on a slide.

Patches are read from the pyramid level closest to (and not coarser than) the target
resolution and resampled only when that level's pixel size differs from the target
by more than ``tolerance``. Patches are grouped into square blocks that are read with
one region read each (the unit of parallel work); the patch order in a store is block
by block, row-major within a block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from .errors import SlideError
from .slide import Slide
from .tissue import TissueMask

#: Resample only if the best level's pixel size is off the target by more than this.
MPP_TOLERANCE = 0.02


@dataclass
class GridPlan:
    slide_mpp: float
    level: int
    level_downsample: float
    read_size: int
    """Pixels read at ``level`` per patch (== ``patch_size`` when not resampled)."""
    patch_size: int
    patch_mpp: float
    """Actual pixel size of the stored patches (µm/px)."""
    footprint: float
    """Patch side in level-0 pixels."""
    resampled: bool
    grid_shape: tuple[int, int]
    """Rows and columns of the full grid (before the tissue filter)."""
    coords: np.ndarray
    """(N, 2) int64 level-0 (x, y) of each kept patch's top-left corner, in store order."""
    grid_index: np.ndarray
    """(N, 2) int64 (row, col) of each kept patch in the grid."""
    tissue_fraction: np.ndarray
    """(N,) float32 share of tissue under each kept patch."""
    block_start: np.ndarray
    """(n_blocks + 1,) offsets: patches ``block_start[b]:block_start[b+1]`` form block ``b``."""
    all_fractions: np.ndarray
    """(rows, cols) tissue fraction of every grid cell (for previews)."""

    @property
    def n_patches(self) -> int:
        return int(self.coords.shape[0])

    @property
    def n_blocks(self) -> int:
        return int(self.block_start.shape[0] - 1)


def cell_fractions(mask: TissueMask, footprint: float, rows: int, cols: int) -> np.ndarray:
    """Tissue fraction of every grid cell: mask pixels summed over each cell's span
    (cells that tile the mask are summed band by band, others from a summed-area table)."""
    m = mask.mask
    d = mask.downsample
    edges_x = np.clip(np.round(np.arange(cols + 1) * footprint / d).astype(int), 0, m.shape[1])
    edges_y = np.clip(np.round(np.arange(rows + 1) * footprint / d).astype(int), 0, m.shape[0])
    x0, x1 = edges_x[:-1], edges_x[1:]
    y0, y1 = edges_y[:-1], edges_y[1:]
    x1 = np.maximum(x1, x0 + 1)
    y1 = np.maximum(y1, y0 + 1)
    x1 = np.minimum(x1, m.shape[1])
    y1 = np.minimum(y1, m.shape[0])
    if (y1 > y0).all() and (x1 > x0).all() and (y0[1:] == y1[:-1]).all() and (x0[1:] == x1[:-1]).all():
        # adjacent cells (a cell at least a mask pixel wide): sums over bands of rows, then of columns
        part = m[y0[0] : y1[-1], x0[0] : x1[-1]]
        s = np.add.reduceat(np.add.reduceat(part, y0 - y0[0], axis=0, dtype=np.int32), x0 - x0[0], axis=1)
    else:
        sat = np.zeros((m.shape[0] + 1, m.shape[1] + 1), np.int64)
        sat[1:, 1:] = m.cumsum(0, dtype=np.int64).cumsum(1)
        s = sat[y1][:, x1] - sat[y0][:, x1] - sat[y1][:, x0] + sat[y0][:, x0]
    area = np.outer(np.maximum(y1 - y0, 1), np.maximum(x1 - x0, 1))
    return (s / area).astype(np.float32)


def plan_grid(
    slide: Slide,
    mask: TissueMask,
    size: int = 256,
    mpp: float = 0.5,
    min_tissue: float = 0.5,
    block_px: int = 2048,
) -> GridPlan:
    """Lay a grid of ``size``-px patches at ``mpp`` µm/px over the slide and keep tissue."""
    slide_mpp = slide.require_mpp()
    target_ds = mpp / slide_mpp
    # The coarsest level that is still at least as fine as the target.
    level = 0
    for i, lv in enumerate(slide.levels):
        if lv.downsample <= target_ds * (1 + MPP_TOLERANCE):
            level = i
    lds = slide.levels[level].downsample
    ratio = target_ds / lds
    if abs(ratio - 1) <= MPP_TOLERANCE:
        read_size, resampled = size, False
        footprint = size * lds
    else:
        # A whole number of pixels is read at the level, and the grid steps by exactly
        # that extent, so each patch covers its grid cell and patch_mpp is the true scale
        # (within half a level pixel of the target).
        read_size, resampled = max(1, int(round(size * ratio))), True
        footprint = read_size * lds
    patch_mpp = slide_mpp * footprint / size
    w0, h0 = slide.info.dimensions
    cols, rows = int(w0 // footprint), int(h0 // footprint)
    if cols == 0 or rows == 0:
        raise SlideError(
            f"{slide.path}: the slide ({w0} x {h0} px at {slide_mpp:.3g} µm/px) is smaller than one "
            f"{size}-px patch at {mpp:g} µm/px ({footprint:.0f} px at full resolution)."
        )
    fr = cell_fractions(mask, footprint, rows, cols)
    keep_r, keep_c = np.nonzero(fr >= min_tissue)
    bsz = max(1, block_px // read_size)
    brow, bcol = keep_r // bsz, keep_c // bsz
    order = np.lexsort((keep_c, keep_r, bcol, brow))
    keep_r, keep_c, brow, bcol = keep_r[order], keep_c[order], brow[order], bcol[order]
    block_id = brow * (cols // bsz + 1) + bcol
    starts = np.flatnonzero(np.r_[True, block_id[1:] != block_id[:-1]]) if block_id.size else np.array([], int)
    block_start = np.r_[starts, block_id.size].astype(np.int64)
    coords = np.stack(
        [np.round(keep_c * footprint), np.round(keep_r * footprint)], axis=1
    ).astype(np.int64).reshape(-1, 2)
    return GridPlan(
        slide_mpp=slide_mpp,
        level=level,
        level_downsample=lds,
        read_size=read_size,
        patch_size=size,
        patch_mpp=patch_mpp,
        footprint=footprint,
        resampled=resampled,
        grid_shape=(rows, cols),
        coords=coords,
        grid_index=np.stack([keep_r, keep_c], axis=1).astype(np.int64).reshape(-1, 2),
        tissue_fraction=fr[keep_r, keep_c].astype(np.float32),
        block_start=block_start,
        all_fractions=fr,
    )


def iter_block(slide: Slide, plan_level: int, lds: float, read_size: int, patch_size: int,
               coords: np.ndarray) -> Iterator[np.ndarray]:
    """The patches of :func:`read_block`, one at a time: where the backend can, and patches
    need no resampling, each is decoded into one reused buffer (valid until the next one
    is asked for), so that it is written out while still in the CPU's cache."""
    iter_patches = getattr(slide._backend, "iter_patches", None)
    if iter_patches is not None and read_size == patch_size:
        yield from iter_patches(plan_level, *_level_xy(coords, lds), read_size)
        return
    yield from read_block(slide, plan_level, lds, read_size, patch_size, coords)


def _level_xy(coords: np.ndarray, lds: float) -> tuple[np.ndarray, np.ndarray]:
    """Level-0 ``coords`` as pixel positions on a level ``lds`` times smaller."""
    return (np.floor(coords[:, 0] / lds + 1e-6).astype(np.int64), np.floor(coords[:, 1] / lds + 1e-6).astype(np.int64))


def read_block(slide: Slide, plan_level: int, lds: float, read_size: int, patch_size: int,
               coords: np.ndarray) -> np.ndarray:
    """Read the patches at level-0 ``coords`` (one block).

    A backend with ``read_patches`` (tiled TIFF) decodes just the tiles under the
    patches, each once; others read the block's bounding box with one region read.
    """
    from PIL import Image

    lx, ly = _level_xy(coords, lds)
    read_patches = getattr(slide._backend, "read_patches", None)
    if read_patches is not None:
        crops = read_patches(plan_level, lx, ly, read_size)
        if read_size == patch_size:
            return crops
        out = np.empty((len(coords), patch_size, patch_size, 3), np.uint8)
        for i, crop in enumerate(crops):
            out[i] = np.asarray(Image.fromarray(crop).resize((patch_size, patch_size), Image.Resampling.LANCZOS))
        return out
    x0, y0 = int(lx.min()), int(ly.min())
    x1, y1 = int(lx.max()) + read_size, int(ly.max()) + read_size
    region = slide.read_region(plan_level, x0, y0, x1 - x0, y1 - y0)
    out = np.empty((len(coords), patch_size, patch_size, 3), np.uint8)
    for i, (px, py) in enumerate(zip(lx - x0, ly - y0)):
        crop = region[py : py + read_size, px : px + read_size]
        if read_size != patch_size:
            crop = np.asarray(
                Image.fromarray(np.ascontiguousarray(crop)).resize((patch_size, patch_size), Image.Resampling.LANCZOS)
            )
        out[i] = crop
    return out
