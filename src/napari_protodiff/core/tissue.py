"""Tissue detection at low resolution with scikit-image.

Tissue is what is coloured (HSV saturation above an Otsu threshold, with a floor),
minus pen ink (blue/green hues, black marker), minus dark debris, minus small specks
(dust) given as an area in µm², with small holes filled. The mask carries its own
scale: ``downsample`` (level-0 pixels per mask pixel) and ``mpp`` (µm per mask pixel).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from .slide import Slide


class TissueParams(BaseModel):
    """Parameters of :func:`detect_tissue` (shared by the API, CLI and Slides widget)."""

    model_config = ConfigDict(extra="forbid")

    mask_mpp: float = Field(8.0, gt=0, description="Resolution of the mask (µm/px) when the slide's mpp is known.")
    max_mask_side: int = Field(4096, ge=64, description="Largest side of the mask (px); bounds memory for huge slides.")
    min_saturation: float = Field(0.07, ge=0, le=1, description="Floor on the saturation threshold (0-1).")
    max_brightness: float = Field(0.96, ge=0, le=1, description="Brighter pixels (HSV value) are glass.")
    min_brightness: float = Field(0.12, ge=0, le=1, description="Darker pixels are black ink or debris.")
    reject_ink: bool = Field(True, description="Reject blue and green pen marks.")
    ink_hue_range: tuple[float, float] = Field((0.22, 0.70), description="Hue range (0-1) of pen ink: green to blue.")
    ink_min_saturation: float = Field(0.25, ge=0, le=1, description="Ink is strongly saturated.")
    ink_margin_um: float = Field(50.0, ge=0, description="Also reject this far around ink (µm).")
    min_object_um2: float = Field(20000.0, ge=0, description="Remove specks (dust) smaller than this area (µm²).")
    max_hole_um2: float = Field(5000.0, ge=0, description="Fill holes smaller than this area (µm²).")


@dataclass
class TissueMask:
    """A boolean tissue mask with its own scale."""

    mask: np.ndarray
    downsample: float
    """Level-0 pixels per mask pixel."""
    mpp: float | None
    """µm per mask pixel (``None`` when the slide's pixel size is unknown)."""
    ink: np.ndarray | None = None

    @property
    def tissue_fraction(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0

    def fraction_in(self, x0: float, y0: float, w: float, h: float) -> float:
        """Share of tissue inside a level-0 rectangle (x0, y0, w, h)."""
        d = self.downsample
        mx0, my0 = int(np.floor(x0 / d)), int(np.floor(y0 / d))
        mx1, my1 = int(np.ceil((x0 + w) / d)), int(np.ceil((y0 + h) / d))
        sub = self.mask[max(0, my0) : my1, max(0, mx0) : mx1]
        return float(sub.mean()) if sub.size else 0.0


def _threads() -> int:
    """Threads for one mask (numpy and scipy release the GIL in what runs here): the CPUs
    this process may use, at most 4 (a mask has a few million pixels)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        n = os.cpu_count() or 1
    return max(1, min(4, n))


def _bands(n_rows: int, n: int, min_rows: int = 64) -> list[slice]:
    """``n`` (or fewer, each at least ``min_rows``) consecutive row slices covering ``n_rows``."""
    n = max(1, min(n, n_rows // max(1, min_rows)))
    edges = np.linspace(0, n_rows, n + 1).round().astype(int)
    return [slice(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


def _map(fn, items: list) -> list:
    """``[fn(x) for x in items]``, in threads when there are several."""
    if len(items) <= 1 or _threads() <= 1:
        return [fn(x) for x in items]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(min(_threads(), len(items)), thread_name_prefix="protodiff-tissue") as pool:
        return list(pool.map(fn, items))


def _select_components(mask: np.ndarray, select, connectivity: int, n_bands: int | None = None) -> np.ndarray:
    """The pixels of ``mask``'s connected components whose size (pixels) ``select(sizes)`` keeps.

    The same as labelling the whole mask (``scipy.ndimage.label`` with 4- or 8-connectivity)
    and looking each pixel's component up, done in horizontal bands, one a thread: each
    band is labelled on its own, and components that touch across a seam (the last row
    of one band, the first of the next; diagonally too with 8-connectivity) are joined
    into one, with one size, before ``select`` sees them."""
    from scipy import ndimage

    bands = _bands(mask.shape[0], _threads() if n_bands is None else n_bands)
    structure = ndimage.generate_binary_structure(2, connectivity)

    def label(band: slice):
        labels, n = ndimage.label(mask[band], structure=structure)
        return labels, n, np.bincount(labels.ravel(), minlength=n + 1)

    parts = _map(label, bands)
    offsets = np.cumsum([0] + [n for _, n, _ in parts])  # band i's labels are offsets[i] + 1 .. offsets[i + 1]
    sizes = np.zeros(int(offsets[-1]) + 1, np.int64)
    for (_, n, counts), off in zip(parts, offsets[:-1]):
        sizes[off + 1 : off + n + 1] = counts[1:]
    comp = np.arange(sizes.size)
    if len(parts) > 1 and offsets[-1]:
        a_ids, b_ids = [], []
        for i in range(1, len(parts)):
            a, b = parts[i - 1][0][-1], parts[i][0][0]  # the rows either side of a seam
            for shift in ((0,) if connectivity == 1 else (-1, 0, 1)):  # b's column = a's + shift
                aa = a[max(0, -shift) : a.size - max(0, shift)]
                bb = b[max(0, shift) : b.size - max(0, -shift)]
                touch = (aa > 0) & (bb > 0)
                a_ids.append(aa[touch].astype(np.int64) + offsets[i - 1])
                b_ids.append(bb[touch].astype(np.int64) + offsets[i])
        ai, bi = np.concatenate(a_ids), np.concatenate(b_ids)
        if ai.size:
            comp = _joined(sizes.size, ai, bi)
    comp_sizes = np.bincount(comp, weights=sizes).astype(np.int64)
    keep = np.asarray(select(comp_sizes), dtype=bool)[comp]
    keep[0] = False  # (label 0 is the background and its own component)
    out = np.empty(mask.shape, bool)

    def lookup(i: int) -> None:
        labels, n, _ = parts[i]
        lut = keep[offsets[i] : offsets[i] + n + 1].copy()
        lut[0] = False
        out[bands[i]] = lut[labels]

    _map(lookup, list(range(len(parts))))
    return out


def _joined(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Component of each of ``n`` labels once label ``a[i]`` is joined with ``b[i]`` for every
    ``i``: each the smallest label of its component (a union-find over the labels that
    touch a seam, a few hundred on a tissue mask; the others are their own component)."""
    pairs = np.unique(np.stack([a, b], axis=1), axis=0)
    nodes, idx = np.unique(pairs, return_inverse=True)
    idx = idx.reshape(-1, 2)
    parent = list(range(nodes.size))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in idx.tolist():
        ri, rj = root(i), root(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)  # nodes are sorted: the root is the smallest label
    comp = np.arange(n)
    comp[nodes] = nodes[[root(i) for i in range(nodes.size)]]
    return comp


def _remove_small(mask: np.ndarray, min_px: int) -> np.ndarray:
    """Drop connected components smaller than ``min_px`` pixels (8-connectivity).

    Components are labelled only inside the bounding box of the mask's pixels (none
    reaches outside it), and not at all when there are fewer pixels than ``min_px``
    (no component can be kept): a few pixels of ink cost nothing, not a full labelling."""
    if min_px <= 1:
        return mask
    n = int(np.count_nonzero(mask))
    if n == 0:
        return mask
    if n < min_px:
        return np.zeros_like(mask)
    box = _bbox(mask)
    out = np.zeros_like(mask)
    out[box] = _select_components(mask[box], lambda sizes: sizes >= min_px, connectivity=2)
    return out


def _bbox(mask: np.ndarray) -> tuple[slice, slice]:
    """The smallest (rows, columns) slices that hold every True pixel of a non-empty 2-D mask."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1)


def _fill_holes(mask: np.ndarray, max_px: int) -> np.ndarray:
    """Fill background components (4-connectivity) smaller than ``max_px`` pixels."""
    if max_px <= 0:
        return mask
    return mask | _select_components(~mask, lambda sizes: sizes < max_px, connectivity=1)


def _close_cross(mask: np.ndarray) -> np.ndarray:
    """``scipy.ndimage.binary_closing(mask, disk(1), border_value=0)`` (a 3 x 3 cross) with
    shifted boolean operations: the same result, several times faster on a big mask."""
    m = np.asarray(mask, dtype=bool)
    if m.ndim != 2 or min(m.shape) < 2:
        from scipy import ndimage
        from skimage import morphology

        return ndimage.binary_closing(m, morphology.disk(1).astype(bool), border_value=0)
    d = m.copy()  # dilation: outside the image counts as background
    d[1:] |= m[:-1]
    d[:-1] |= m[1:]
    d[:, 1:] |= m[:, :-1]
    d[:, :-1] |= m[:, 1:]
    e = d.copy()  # erosion: a pixel on the border has a background neighbour outside
    e[1:] &= d[:-1]
    e[:-1] &= d[1:]
    e[:, 1:] &= d[:, :-1]
    e[:, :-1] &= d[:, 1:]
    e[0], e[-1], e[:, 0], e[:, -1] = False, False, False, False
    return e


def _px_area(um2: float, mpp_mask: float | None, fallback_px: int) -> int:
    if mpp_mask is None:
        return fallback_px
    return int(round(um2 / (mpp_mask * mpp_mask)))


def _rgb2hsv(rgb: np.ndarray) -> np.ndarray:
    """``skimage.color.rgb2hsv`` of an RGB uint8 image, the same values, faster on big images.

    HSV is a function of each pixel's colour alone, and a slide thumbnail has far fewer
    distinct colours than pixels: convert each distinct colour once (with skimage) and
    look the pixels up.
    """
    from skimage import color

    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[-1] != 3 or rgb.shape[0] * rgb.shape[1] < (1 << 20):
        return color.rgb2hsv(rgb)
    code = (rgb[..., 0].astype(np.uint32) << 16) | (rgb[..., 1].astype(np.uint32) << 8) | rgb[..., 2]
    present = np.zeros(1 << 24, bool)
    present[code] = True
    colours = np.flatnonzero(present).astype(np.uint32)
    index = np.empty(1 << 24, np.int32)
    index[colours] = np.arange(colours.size, dtype=np.int32)
    rgb_u = np.stack([colours >> 16, (colours >> 8) & 255, colours & 255], axis=-1).astype(np.uint8)
    return color.rgb2hsv(rgb_u)[index[code]]


def _saturation_value(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """HSV saturation and value of an RGB image: exactly ``skimage.color.rgb2hsv``'s (float64).

    For uint8 both are functions of each pixel's largest and smallest channel: value is
    ``F[max]`` and saturation ``(F[max] - F[min]) / F[max]`` with ``F`` skimage's own uint8
    to float conversion, looked up from tables (the same float64 operations as skimage's,
    done once per (max, min) pair instead of once per pixel)."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[-1] != 3:
        hsv = _rgb2hsv(rgb)
        return hsv[..., 1], hsv[..., 2]
    f, sat = _sv_tables()
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    mx = np.maximum(np.maximum(r, g), b)
    mn = np.minimum(np.minimum(r, g), b)
    pair = mx.astype(np.uint16) << 8
    pair |= mn
    return sat[pair], f[mx]


@functools.cache
def _sv_tables() -> tuple[np.ndarray, np.ndarray]:
    """(F, S): skimage's uint8 -> float64 values, and the saturation of every (max, min) pair at ``max << 8 | min``."""
    from skimage.util import img_as_float

    f = img_as_float(np.arange(256, dtype=np.uint8))
    mx, mn = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
    delta = f[mx] - f[mn]  # np.ptp of the float channels: max minus min
    with np.errstate(invalid="ignore", divide="ignore"):
        sat = delta / f[mx]
    sat[delta == 0.0] = 0.0
    return f, np.ascontiguousarray(sat.reshape(-1))


def _hue(pixels: np.ndarray) -> np.ndarray:
    """``skimage.color.rgb2hsv`` hue of (n, 3) pixels: for uint8, skimage's own float64
    operations in its order (a channel that is the maximum overrides the ones before it)."""
    if pixels.shape[0] == 0:
        return np.zeros(0)
    if pixels.dtype != np.uint8:
        return _rgb2hsv(pixels[None])[0, :, 0]
    f = _sv_tables()[0]
    r, g, b = f[pixels[:, 0]], f[pixels[:, 1]], f[pixels[:, 2]]
    v = np.maximum(np.maximum(r, g), b)
    delta = v - np.minimum(np.minimum(r, g), b)
    with np.errstate(invalid="ignore", divide="ignore"):
        h = np.where(r == v, (g - b) / delta, 0.0)
        h = np.where(g == v, 2.0 + (b - r) / delta, h)
        h = np.where(b == v, 4.0 + (r - g) / delta, h)
    h = (h / 6.0) % 1.0
    h[delta == 0.0] = 0.0
    h[np.isnan(h)] = 0.0
    return h


@functools.cache
def _pair_max() -> np.ndarray:
    """The largest channel of each (max, min) pair code ``max << 8 | min``."""
    return np.repeat(np.arange(256), 256)


def _extremes(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each pixel's largest channel (uint8) and its (max, min) pair code ``max << 8 | min`` (uint16)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    mx = np.maximum(np.maximum(r, g), b)
    pair = np.minimum(np.minimum(r, g), b).astype(np.uint16)
    pair |= mx.astype(np.uint16) << 8
    return mx, pair


def _otsu_of_counts(values: np.ndarray, counts: np.ndarray) -> float:
    """``skimage.filters.threshold_otsu`` of an image whose distinct values are ``values``,
    each ``counts`` times: the same 256-bin histogram over the image's range (a bin is a
    function of the value alone) and the same Otsu arithmetic, without the pixels."""
    from skimage import filters

    hist, edges = np.histogram(values, bins=256, range=(values.min(), values.max()), weights=counts)
    centers = (edges[:-1] + edges[1:]) / 2.0
    return float(filters.threshold_otsu(hist=(hist, centers)))


def detect_tissue_rgb(rgb: np.ndarray, params: TissueParams | None = None, mpp: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Tissue and ink masks of an RGB uint8 image whose pixels are ``mpp`` µm (or unknown).

    The colour tests (glass, dark, saturation, the Otsu threshold) are the same as on
    ``skimage.color.rgb2hsv``'s float64 saturation and value, but for a uint8 image they
    are made once per (max, min) channel pair and looked up (no per-pixel float arrays).
    """
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[-1] != 3:
        return _detect_tissue_hsv(rgb, params or TissueParams(), mpp)
    p = params or TissueParams()
    f, sat = _sv_tables()
    pmax = _pair_max()
    glass_v, dark_v = f > p.max_brightness, f < p.min_brightness  # by value, i.e. by the largest channel
    cand_pair = ~glass_v[pmax] & ~dark_v[pmax]
    # In bands of rows (each small enough to stay in the CPU's cache), several at a time.
    bands = _bands(rgb.shape[0], 4 * _threads(), min_rows=max(1, (1 << 18) // max(1, rgb.shape[1])))

    def pairs(band: slice) -> tuple[np.ndarray, np.ndarray]:
        pair = _extremes(rgb[band])[1]
        return pair, np.bincount(pair.ravel(), minlength=1 << 16)

    coded = _map(pairs, bands)
    counts = np.sum([c for _, c in coded], axis=0) * cand_pair
    # Otsu on the saturation of non-glass pixels, never below the floor.
    present = counts > 0
    values, weights = sat[present], counts[present]
    thr = p.min_saturation
    if weights.sum() > 64 and values.max() - values.min() > 1e-3:
        thr = max(thr, _otsu_of_counts(values, weights) * 0.5)
    tissue_of_pair = cand_pair & (sat > thr)
    ink_of_pair = (sat >= p.ink_min_saturation) & ~glass_v[pmax]
    lo, hi = p.ink_hue_range
    tissue = np.empty(rgb.shape[:2], bool)
    ink = np.zeros(rgb.shape[:2], bool)

    def masks(i: int) -> None:
        band, pair = bands[i], coded[i][0]
        tissue[band] = tissue_of_pair[pair]
        if not p.reject_ink:
            return
        px = rgb[band]
        mx = (pair >> 8).astype(np.uint8)
        k = ink_of_pair[pair]
        if lo > 1 / 6 and hi < 5 / 6:
            # A pixel whose red channel is the largest has a hue in [0, 1/6] or [5/6, 1)
            # (skimage lets green, then blue, override a tie): never pen ink's.
            k &= px[..., 0] < mx
        hue = _hue(px[k])  # hue only where it can matter
        k[k] = (hue >= lo) & (hue <= hi)
        k |= dark_v[mx]  # black marker and debris
        ink[band] = k

    _map(masks, list(range(len(bands))))
    if p.reject_ink:
        ink = _ink_with_margin(ink, p, mpp)
        tissue &= ~ink
    return _clean(tissue, ink, p, mpp), ink


def _detect_tissue_hsv(rgb: np.ndarray, p: TissueParams, mpp: float | None) -> tuple[np.ndarray, np.ndarray]:
    """:func:`detect_tissue_rgb` for other images (not 8-bit RGB), on skimage's HSV."""
    from skimage import filters

    hsv = _rgb2hsv(rgb)
    s, v = hsv[..., 1], hsv[..., 2]
    glass = v > p.max_brightness
    dark = v < p.min_brightness
    cand = ~glass & ~dark
    vals = s[cand]
    thr = p.min_saturation
    if vals.size > 64 and np.ptp(vals) > 1e-3:
        thr = max(thr, float(filters.threshold_otsu(vals)) * 0.5)
    tissue = cand & (s > thr)
    ink = np.zeros_like(tissue)
    if p.reject_ink:
        lo, hi = p.ink_hue_range
        ink = (s >= p.ink_min_saturation) & ~glass
        ink[ink] = (hsv[..., 0][ink] >= lo) & (hsv[..., 0][ink] <= hi)
        ink |= dark
        ink = _ink_with_margin(ink, p, mpp)
        tissue &= ~ink
    return _clean(tissue, ink, p, mpp), ink


def _ink_with_margin(ink: np.ndarray, p: TissueParams, mpp: float | None) -> np.ndarray:
    """Ink without specks, grown by ``p.ink_margin_um``."""
    from scipy import ndimage

    ink = _remove_small(ink, _px_area(2000.0, mpp, 16))
    if mpp is not None and p.ink_margin_um > 0:
        r = int(round(p.ink_margin_um / mpp))
        if r > 0 and ink.any():  # (no ink: nothing to dilate)
            ink = ndimage.distance_transform_edt(~ink) <= r  # a disk-shaped dilation, fast for any r
    return ink


def _clean(tissue: np.ndarray, ink: np.ndarray, p: TissueParams, mpp: float | None) -> np.ndarray:
    """Close, fill small holes, keep ink out, drop specks."""
    min_obj = _px_area(p.min_object_um2, mpp, max(16, tissue.size // 20000))
    max_hole = _px_area(p.max_hole_um2, mpp, max(4, tissue.size // 100000))
    tissue = _close_cross(tissue)
    tissue = _fill_holes(tissue, max_hole)
    if p.reject_ink:
        tissue &= ~ink
    return _remove_small(tissue, min_obj)


def mask_downsample(slide: Slide, params: TissueParams) -> float:
    """Level-0 pixels per mask pixel for this slide and these parameters."""
    w0, h0 = slide.info.dimensions
    ds = 1.0
    if slide.mpp is not None:
        ds = max(1.0, params.mask_mpp / slide.mpp)
    return max(ds, max(w0, h0) / params.max_mask_side)


def detect_tissue(slide: Slide, params: TissueParams | None = None) -> TissueMask:
    """Detect tissue on a low-resolution view of ``slide``."""
    p = params or TissueParams()
    rgb, ds = slide.read_downsampled(mask_downsample(slide, p))
    mpp = None if slide.mpp is None else slide.mpp * ds
    tissue, ink = detect_tissue_rgb(rgb, p, mpp)
    return TissueMask(mask=tissue, downsample=ds, mpp=mpp, ink=ink)
