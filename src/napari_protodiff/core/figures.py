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


def prototype_overlay_png(rgb: np.ndarray, downsample: float, labels: np.ndarray, footprint: float,
                          colors: np.ndarray, path: str | Path, alpha: float = 0.45) -> Path:
    """Thumbnail ``rgb`` (at ``downsample``) with each patch cell tinted by its prototype, and a legend.

    ``labels`` is the prototype map on the patch grid (0: no patch, ``j + 1``: prototype ``j``)
    whose cells are ``footprint`` level-0 pixels wide.
    """
    from PIL import Image, ImageDraw

    img = rgb.astype(np.float32)
    h, w = img.shape[:2]
    # Map every thumbnail pixel to its grid cell.
    rows = np.minimum((np.arange(h) * downsample / footprint).astype(np.int64), labels.shape[0] - 1)
    cols = np.minimum((np.arange(w) * downsample / footprint).astype(np.int64), labels.shape[1] - 1)
    lab = labels[rows][:, cols].astype(np.int64)
    inside = (np.arange(h)[:, None] * downsample < labels.shape[0] * footprint) & \
             (np.arange(w)[None, :] * downsample < labels.shape[1] * footprint)
    m = (lab > 0) & inside
    lut = np.vstack([np.zeros((1, 3)), np.asarray(colors, np.float32)])
    img[m] = img[m] * (1 - alpha) + lut[lab[m]] * alpha
    out = Image.fromarray(img.clip(0, 255).astype(np.uint8))
    k = len(colors)
    sw = 14
    legend = Image.new("RGB", (out.width, sw + 8), (255, 255, 255))
    draw = ImageDraw.Draw(legend)
    x = 4
    for j in range(k):
        draw.rectangle([x, 4, x + sw - 1, 4 + sw - 1], fill=tuple(int(v) for v in colors[j]))
        draw.text((x + sw + 3, 4), str(j), fill=(0, 0, 0))
        x += sw + 10 + 7 * len(str(j))
        if x > out.width - 40:
            break
    full = Image.new("RGB", (out.width, out.height + legend.height), (255, 255, 255))
    full.paste(out, (0, 0))
    full.paste(legend, (0, out.height))
    full.save(path)
    return Path(path)


def exemplar_gallery_png(rows: list[np.ndarray], colors: np.ndarray, path: str | Path, gap: int = 2,
                         titles: list[str] | None = None) -> Path:
    """One row per prototype: a colour bar with its index, then its exemplar patches (each (E, S, S, 3))."""
    from PIL import Image, ImageDraw

    s = max((r.shape[1] for r in rows if len(r)), default=32)
    ncol = max((len(r) for r in rows), default=1)
    bar = 36
    canvas = np.full((len(rows) * (s + gap) + gap, bar + ncol * (s + gap) + gap, 3), 255, np.uint8)
    for i, r in enumerate(rows):
        y = gap + i * (s + gap)
        canvas[y:y + s, gap:bar - 2] = colors[i]
        for j in range(len(r)):
            x = bar + gap + j * (s + gap)
            canvas[y:y + s, x:x + s] = r[j][:s, :s]
    img = Image.fromarray(canvas)
    draw = ImageDraw.Draw(img)
    for i in range(len(rows)):
        label = titles[i] if titles else str(i)
        draw.text((gap + 3, gap + i * (s + gap) + 3), label, fill=(255, 255, 255))
    img.save(path)
    return Path(path)
