"""Pictures a user can look at: tissue/grid overlays and patch mosaics (PNG, headless)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .grid import GridPlan
from .tissue import TissueMask


def overlay_png(rgb: np.ndarray, downsample: float, mask: TissueMask, grid: GridPlan | None, path: str | Path) -> Path:
    """Thumbnail ``rgb`` (at ``downsample``) with tissue tinted green, ink red and kept patches outlined."""
    from PIL import Image, ImageDraw

    img = rgb.astype(np.float32)
    h, w = img.shape[:2]
    m = np.asarray(Image.fromarray(mask.mask.astype(np.uint8) * 255).resize((w, h), Image.Resampling.NEAREST)) > 0
    img[m] = img[m] * 0.6 + np.array([60, 200, 60]) * 0.4
    if mask.ink is not None and mask.ink.any():
        k = np.asarray(Image.fromarray(mask.ink.astype(np.uint8) * 255).resize((w, h), Image.Resampling.NEAREST)) > 0
        img[k] = img[k] * 0.4 + np.array([230, 30, 30]) * 0.6
    out = Image.fromarray(img.clip(0, 255).astype(np.uint8))
    if grid is not None:
        draw = ImageDraw.Draw(out)
        f = grid.footprint / downsample
        for x, y in grid.coords / downsample:
            draw.rectangle([x, y, x + f - 1, y + f - 1], outline=(20, 20, 160))
    out.save(path)
    return Path(path)


def mosaic_png(patches: np.ndarray, path: str | Path, columns: int = 8, gap: int = 2) -> Path:
    """Patches (N, S, S, 3) as one grid image."""
    from PIL import Image

    n, s = patches.shape[0], patches.shape[1]
    cols = max(1, min(columns, n))
    rows = max(1, -(-n // cols))
    canvas = np.full((rows * (s + gap) + gap, cols * (s + gap) + gap, 3), 255, np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        canvas[gap + r * (s + gap): gap + r * (s + gap) + s, gap + c * (s + gap): gap + c * (s + gap) + s] = patches[i]
    Image.fromarray(canvas).save(path)
    return Path(path)
