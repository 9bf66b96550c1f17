"""Helpers shared by the slide backends."""

from __future__ import annotations

import math

import numpy as np

from ..errors import SlideError

#: Dask chunks are whole multiples of the file's tiles, at least this many pixels wide.
MIN_CHUNK = 512


def chunk_size(tile: int) -> int:
    tile = max(1, int(tile))
    return tile * max(1, math.ceil(MIN_CHUNK / tile))


def check_rgb8(path, dtype, samples: int, what: str = "image") -> None:
    """Refuse pixel formats that H&E tiling cannot use, with one clear sentence."""
    if np.dtype(dtype) != np.uint8:
        raise SlideError(
            f"{path}: the {what} has {np.dtype(dtype).itemsize * 8}-bit {np.dtype(dtype).name} pixels; "
            "protodiff needs 8-bit RGB (convert it, e.g. to an 8-bit RGB TIFF)."
        )
    if samples == 1:
        raise SlideError(f"{path}: the {what} is grayscale; protodiff needs an 8-bit RGB (H&E) image.")
    if samples == 4:
        raise SlideError(
            f"{path}: the {what} is RGBA; protodiff needs 8-bit RGB (flatten the alpha channel first)."
        )
    if samples != 3:
        raise SlideError(f"{path}: the {what} has {samples} channels; protodiff needs 8-bit RGB.")


def empty_rgb(shape: tuple[int, ...]) -> np.ndarray:
    """``np.empty(shape, np.uint8)`` for pixels that libjpeg-turbo decodes into: its data
    starts 8 bytes past a 64-byte boundary, so no row is 16- or 32-byte aligned (for rows of
    a multiple of 32 bytes, such as 256 RGB pixels).

    libjpeg-turbo's SIMD colour conversion writes rows that are aligned with non-temporal
    stores (``movntdq``, past the cache) and others with ordinary ones. Tiling reads every
    decoded patch again at once (to write it to the store), so the cache is where the
    pixels should go: decoding a 256-px tile into an aligned buffer takes 0.48 ms here, into
    this one 0.37 ms (benchmarks/tiling.py, docs/benchmarks.md). A buffer from ``np.empty``
    is aligned or not by chance of the allocator."""
    n = int(np.prod(shape))
    raw = np.empty(n + 64, np.uint8)
    start = (8 - raw.ctypes.data) % 64
    return raw[start:start + n].reshape(shape)


def padded_read(read, level_w: int, level_h: int, x: int, y: int, w: int, h: int) -> np.ndarray:
    """Call ``read(x0, y0, x1, y1)`` on the in-bounds part of a region and pad with white."""
    out = np.full((h, w, 3), 255, dtype=np.uint8)
    x0, y0 = max(0, x), max(0, y)
    x1, y1 = min(level_w, x + w), min(level_h, y + h)
    if x1 > x0 and y1 > y0:
        out[y0 - y : y1 - y, x0 - x : x1 - x] = read(x0, y0, x1, y1)
    return out


class LevelArray:
    """A numpy-like view of one level for ``dask.array.from_array`` (reads on slicing)."""

    ndim = 3
    dtype = np.dtype(np.uint8)

    def __init__(self, backend, level: int) -> None:
        lv = backend.levels()[level]
        self.backend, self.level = backend, level
        self.shape = (lv.height, lv.width, 3)

    def __getitem__(self, key):
        ys, xs = key[0], key[1]
        y0, y1, _ = ys.indices(self.shape[0])
        x0, x1, _ = xs.indices(self.shape[1])
        region = self.backend.read_region(self.level, x0, y0, x1 - x0, y1 - y0)
        rest = key[2:] if len(key) > 2 else ()
        return region[(slice(None), slice(None), *rest)] if rest else region

    def __dask_tokenize__(self):
        return ("protodiff-level", str(self.backend.path), self.level)


def level_dask(backend, level: int):
    import dask.array as da

    lv = backend.levels()[level]
    chunks = (chunk_size(lv.tile_height), chunk_size(lv.tile_width), 3)
    name = f"protodiff-{backend.name}-{abs(hash((str(backend.path), level))):x}"
    return da.from_array(LevelArray(backend, level), chunks=chunks, asarray=False, fancy=False, name=name)
