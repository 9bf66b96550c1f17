"""Grid cell tissue fractions: the band sums give exactly the summed-area table's values."""

from __future__ import annotations

import numpy as np
import pytest

from napari_protodiff.core.grid import cell_fractions
from napari_protodiff.core.tissue import TissueMask


def _summed_area_fractions(mask: TissueMask, footprint: float, rows: int, cols: int) -> np.ndarray:
    m = mask.mask.astype(np.float64)
    sat = np.zeros((m.shape[0] + 1, m.shape[1] + 1))
    sat[1:, 1:] = m.cumsum(0).cumsum(1)
    d = mask.downsample
    ex = np.clip(np.round(np.arange(cols + 1) * footprint / d).astype(int), 0, m.shape[1])
    ey = np.clip(np.round(np.arange(rows + 1) * footprint / d).astype(int), 0, m.shape[0])
    x0, x1, y0, y1 = ex[:-1], ex[1:], ey[:-1], ey[1:]
    x1 = np.minimum(np.maximum(x1, x0 + 1), m.shape[1])
    y1 = np.minimum(np.maximum(y1, y0 + 1), m.shape[0])
    s = sat[y1][:, x1] - sat[y0][:, x1] - sat[y1][:, x0] + sat[y0][:, x0]
    return (s / np.outer(np.maximum(y1 - y0, 1), np.maximum(x1 - x0, 1))).astype(np.float32)


@pytest.mark.parametrize("shape, downsample, footprint, rows, cols", [
    ((500, 500), 16, 256, 31, 31),      # cells of 16 mask px; the grid stops short of the mask's edge
    ((100, 130), 3.7, 10, 40, 50),      # fractional cells, past the mask's edge
    ((100, 130), 20, 10, 80, 100),      # cells smaller than a mask pixel: the summed-area path
    ((64, 64), 1, 1, 64, 64),
    ((77, 91), 5.3, 33.1, 13, 15),
])
def test_cell_fractions_equal_a_summed_area_table(shape, downsample, footprint, rows, cols):
    rng = np.random.default_rng(0)
    for p in (0.0, 0.3, 0.9, 1.0):
        mask = TissueMask(rng.random(shape) < p, downsample, None)
        np.testing.assert_array_equal(cell_fractions(mask, footprint, rows, cols),
                                      _summed_area_fractions(mask, footprint, rows, cols))
