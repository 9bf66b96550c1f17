"""Training data for the diffusion stage: a store's patches as model inputs, with prototypes.

Patches of the store's complete slides (store order, the order prototype labels follow)
are read once, resized to the model's ``image_size`` (area averaging) and kept as uint8;
:meth:`PatchData.images` turns a batch into float tensors in [-1, 1]. A seeded split
keeps a few patches out of training to report reconstruction and classifier quality.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..store import PatchStore
from .errors import PrototypeError
from .prototypes_adapter import PrototypeSet, read_prototypes


@dataclass
class PatchData:
    pixels: np.ndarray
    """(N, S, S, 3) uint8 at the model's size."""
    labels: np.ndarray
    """(N,) int64 prototype of each patch."""
    index: np.ndarray
    """(N,) int64 position of each patch in the store."""
    prototypes: PrototypeSet
    store_path: str
    patch_mpp: float

    def __len__(self) -> int:
        return len(self.pixels)

    def images(self, idx=None, device="cpu"):
        import torch

        px = self.pixels if idx is None else self.pixels[np.asarray(idx)]
        x = torch.from_numpy(np.ascontiguousarray(px)).to(device).permute(0, 3, 1, 2).float()
        return x / 127.5 - 1.0

    def split(self, holdout: int, seed: int) -> tuple["PatchData", "PatchData"]:
        n = len(self)
        holdout = int(min(holdout, max(0, n // 5)))
        perm = np.random.default_rng(seed).permutation(n)
        tr, te = np.sort(perm[holdout:]), np.sort(perm[:holdout])
        return self._take(tr), self._take(te)

    def _take(self, sel: np.ndarray) -> "PatchData":
        return PatchData(self.pixels[sel], self.labels[sel], self.index[sel], self.prototypes, self.store_path,
                         self.patch_mpp)


def resize_uint8(pix: np.ndarray, size: int) -> np.ndarray:
    """(N, S, S, 3) uint8 -> (N, size, size, 3) uint8 (area averaging down, bilinear up)."""
    if pix.shape[1] == size:
        return pix
    import torch
    import torch.nn.functional as F

    out = []
    for i in range(0, len(pix), 1024):
        x = torch.from_numpy(np.ascontiguousarray(pix[i:i + 1024])).permute(0, 3, 1, 2).float()
        mode = "area" if size < pix.shape[1] else "bilinear"
        y = F.interpolate(x, size=(size, size), mode=mode, **({} if mode == "area" else {"align_corners": False}))
        out.append(y.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy())
    return np.concatenate(out)


def load_patch_data(store: str | Path, image_size: int, max_patches: int | None = None, seed: int = 0) -> PatchData:
    """Read a store's patches and prototypes; a one-sentence error if either is missing."""
    st = PatchStore(store)
    pset = read_prototypes(st)  # raises PrototypeError when the store has none
    entries = st.slides()
    n = int(sum(e.n_patches for e in entries))
    if n == 0:
        raise PrototypeError(f"{st.path}: the store has no patches to train on.")
    sel = np.arange(n)
    if max_patches and max_patches < n:
        sel = np.sort(np.random.default_rng(seed).choice(n, size=max_patches, replace=False))
    parts, start = [], 0
    for e in entries:
        stop = start + e.n_patches
        local = sel[(sel >= start) & (sel < stop)] - start
        if len(local):
            arr = e.group["patches"]
            parts.append(resize_uint8(np.asarray(arr.oindex[local] if len(local) < e.n_patches else arr[:]),
                                      image_size))
        start = stop
    pix = np.concatenate(parts)
    patch_mpp = float(entries[0].attrs.get("patch_mpp") or st.mpp) * st.patch_size / image_size
    return PatchData(pix, pset.labels[sel].astype(np.int64), sel.astype(np.int64), pset, str(st.path), patch_mpp)
