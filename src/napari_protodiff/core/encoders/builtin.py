"""The built-in encoder: H&E stain statistics, colour and texture features, no weights.

Fast on a CPU, deterministic (pure numpy, no randomness) and vectorised over the
batch. Each patch becomes :data:`DIM` numbers, all roughly in [0, 1]:

* **stains** (15): colour deconvolution into haematoxylin, eosin and DAB optical
  densities (Ruifrok & Johnston, the matrix of ``skimage.color.rgb2hed``, through a
  256-entry lookup table); mean, standard deviation and 10/50/90th percentiles of each;
* **tissue** (1): share of pixels darker than the glass background;
* **colour** (30): RGB mean and standard deviation, 8-bin histograms of R, G and B;
* **stain histograms** (16): 8-bin histograms of the H and E densities;
* **texture** (17): grey-level co-occurrence (16 levels, offsets right and down,
  symmetric): contrast, dissimilarity, homogeneity, energy, correlation; rotation-
  invariant uniform local binary patterns (8 neighbours, radius 1): 10-bin histogram;
  gradient magnitude mean and standard deviation.

Features do not depend on the patch size or pixel size, so the encoder takes any
store; their units differ, so prototypes standardise them by default.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from .registry import Encoder, register_encoder

VERSION = "1"
H_BINS = np.linspace(0.0, 0.24, 9, dtype=np.float32)
GLCM_LEVELS = 16
BACKGROUND = 215  # mean RGB above this is glass


def feature_names() -> list[str]:
    names = []
    for s in ("h", "e", "d"):
        names += [f"{s}_mean", f"{s}_std", f"{s}_p10", f"{s}_p50", f"{s}_p90"]
    names.append("tissue_fraction")
    names += [f"{c}_mean" for c in "rgb"] + [f"{c}_std" for c in "rgb"]
    names += [f"{c}_hist{i}" for c in "rgb" for i in range(8)]
    names += [f"{s}_hist{i}" for s in "he" for i in range(8)]
    names += ["glcm_contrast", "glcm_dissimilarity", "glcm_homogeneity", "glcm_energy", "glcm_correlation"]
    names += [f"lbp{i}" for i in range(10)]
    names += ["grad_mean", "grad_std"]
    return names


DIM = len(feature_names())


@lru_cache(maxsize=1)
def _od_lut() -> np.ndarray:
    """Per uint8 value: log(max(v / 255, 1e-6)) / log(1e-6), as in ``skimage.color.separate_stains``."""
    v = np.maximum(np.arange(256, dtype=np.float64) / 255.0, 1e-6)
    return (np.log(v) / np.log(1e-6)).astype(np.float32)


@lru_cache(maxsize=1)
def _hed_matrix() -> np.ndarray:
    from skimage.color import hed_from_rgb

    return np.asarray(hed_from_rgb, np.float32)


@lru_cache(maxsize=1)
def _lbp_lut() -> np.ndarray:
    """Rotation-invariant uniform LBP (riu2) label of each 8-bit code: ones count if <= 2 transitions, else 9."""
    lut = np.empty(256, np.int64)
    for c in range(256):
        bits = [(c >> i) & 1 for i in range(8)]
        u = sum(bits[i] != bits[(i + 1) % 8] for i in range(8))
        lut[c] = sum(bits) if u <= 2 else 9
    return lut


def _hist(values: np.ndarray, n_bins: int) -> np.ndarray:
    """Per-row normalised histogram of integer bin indices (N, P) in [0, n_bins)."""
    n, p = values.shape
    flat = (values + (np.arange(n) * n_bins)[:, None]).ravel()
    return np.bincount(flat, minlength=n * n_bins).reshape(n, n_bins).astype(np.float32) / max(p, 1)


def _glcm_features(gray: np.ndarray) -> np.ndarray:
    n = gray.shape[0]
    L = GLCM_LEVELS
    q = (gray.astype(np.int64) * L) // 256
    counts = np.zeros((n, L * L), np.float64)
    for a, b in ((q[:, :, :-1], q[:, :, 1:]), (q[:, :-1, :], q[:, 1:, :])):
        idx = (a * L + b).reshape(n, -1)
        flat = (idx + (np.arange(n) * L * L)[:, None]).ravel()
        counts += np.bincount(flat, minlength=n * L * L).reshape(n, L * L)
    p = counts.reshape(n, L, L)
    p = p + p.transpose(0, 2, 1)
    p /= p.sum(axis=(1, 2), keepdims=True)
    i, j = np.meshgrid(np.arange(L), np.arange(L), indexing="ij")
    diff = (i - j).astype(np.float64)
    contrast = (p * diff**2).sum(axis=(1, 2)) / (L - 1) ** 2
    dissim = (p * np.abs(diff)).sum(axis=(1, 2)) / (L - 1)
    homog = (p / (1.0 + diff**2)).sum(axis=(1, 2))
    energy = np.sqrt((p**2).sum(axis=(1, 2)))
    mu = (p * i).sum(axis=(1, 2))  # symmetric: mu_i == mu_j
    var = (p * (i - mu[:, None, None]) ** 2).sum(axis=(1, 2))
    cov = (p * (i - mu[:, None, None]) * (j - mu[:, None, None])).sum(axis=(1, 2))
    corr = np.where(var > 1e-12, cov / np.maximum(var, 1e-12), 1.0)
    return np.stack([contrast, dissim, homog, energy, (corr + 1) / 2], axis=1).astype(np.float32)


def _lbp_hist(gray: np.ndarray) -> np.ndarray:
    g = gray.astype(np.int16)
    c = g[:, 1:-1, 1:-1]
    code = np.zeros(c.shape, np.uint8)
    shifts = ((0, 1), (-1, 1), (-1, 0), (-1, -1), (0, -1), (1, -1), (1, 0), (1, 1))
    h, w = g.shape[1], g.shape[2]
    for bit, (dy, dx) in enumerate(shifts):
        nb = g[:, 1 + dy: h - 1 + dy, 1 + dx: w - 1 + dx]
        code |= (nb >= c).astype(np.uint8) << bit
    labels = _lbp_lut()[code].reshape(code.shape[0], -1)
    return _hist(labels, 10)


def stain_texture_features(patches: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, :data:`DIM`) float32 (see the module docstring)."""
    n = patches.shape[0]
    if n == 0:
        return np.zeros((0, DIM), np.float32)
    x = np.ascontiguousarray(patches)
    npx = x.shape[1] * x.shape[2]
    chans = np.ascontiguousarray(x.reshape(n, npx, 3).transpose(2, 0, 1))  # (3, N, P) uint8
    lut, m = _od_lut(), _hed_matrix()
    logs = [lut[chans[c]] for c in range(3)]
    od = np.empty((3, n, npx), np.float32)  # H, E, D optical densities
    for s in range(3):
        np.maximum(logs[0] * m[0, s] + logs[1] * m[1, s] + logs[2] * m[2, s], 0, out=od[s])
    pct = np.percentile(od, [10, 50, 90], axis=2)  # (3 pct, 3 stains, N)
    stains = np.concatenate([od.mean(2)[None], od.std(2)[None], pct], axis=0)  # (5, 3, N)
    stains = (stains.transpose(2, 1, 0).reshape(n, 15) * 4.0).astype(np.float32)  # H/E densities are ~0-0.25
    gray_f = (chans[0].astype(np.float32) + chans[1] + chans[2]) / 3.0
    tissue = (gray_f < BACKGROUND).mean(1, keepdims=True)
    rgbf = chans.astype(np.float32) / 255.0
    colour = np.concatenate([rgbf.mean(2).T, rgbf.std(2).T * 2.0], axis=1)
    hists = [_hist((chans[c] >> 5).astype(np.int64), 8) for c in range(3)]
    he_h = [_hist(np.minimum((od[c] * (8 / H_BINS[-1])).astype(np.int64), 7), 8) for c in range(2)]
    gray = gray_f.reshape(n, x.shape[1], x.shape[2])
    glcm = _glcm_features(gray.astype(np.uint8))
    lbp = _lbp_hist(gray.astype(np.uint8))
    g = gray / 255.0
    gx, gy = g[:, :-1, 1:] - g[:, :-1, :-1], g[:, 1:, :-1] - g[:, :-1, :-1]
    mag = np.sqrt(gx**2 + gy**2).reshape(n, -1)
    grad = np.stack([mag.mean(1) * 4.0, mag.std(1) * 4.0], axis=1)
    out = np.concatenate([stains, tissue, colour, *hists, *he_h, glcm, lbp, grad], axis=1)
    return out.astype(np.float32)


class BuiltinEncoder(Encoder):
    """Stain + colour + texture features (see the module docstring)."""

    def __init__(self, device: str | None = "cpu", max_pixels: int = 1 << 21) -> None:
        super().__init__(name="builtin", kind="builtin", dim=DIM, arch="stain-texture", device="cpu",
                         extra={"version": VERSION})
        self.max_pixels = int(max_pixels)

    def encode(self, batch: np.ndarray) -> np.ndarray:
        b = self.check_batch(batch)
        if b.shape[0] == 0:
            return np.zeros((0, DIM), np.float32)
        step = max(1, self.max_pixels // (b.shape[1] * b.shape[2]))
        return np.concatenate([stain_texture_features(b[i:i + step]) for i in range(0, b.shape[0], step)])


def _factory(device: str | None = "cpu", **_: object) -> BuiltinEncoder:
    return BuiltinEncoder(device=device)


register_encoder("builtin", _factory, "H&E stain statistics, colour and texture features (no weights; CPU).",
                 needs_weights=False)
register_encoder("stain-texture", _factory, "Alias of builtin.", needs_weights=False)
