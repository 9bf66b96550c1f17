"""Patches for pretraining: zarr patch stores, the real/synthetic hybrid sampler, the multi-crop dataset.

* :class:`PatchSource` reads patch *i* of a store's complete slides straight from its
  chunk file (one chunk per patch, raw or Blosc; see docs/patch-store.md), decoding with
  the same codec zarr uses, without zarr's per-read overhead; any other layout is read
  through zarr.
* :class:`HybridSampler` draws a fixed number of images per epoch, ``round(f * n)`` of
  them real and the rest synthetic (``f`` the real fraction), cycling through each
  pool in a fresh random order so every patch is seen as evenly as possible. The plan
  depends only on (seed, epoch), and each image carries its own augmentation seed, so
  a run is the same with any number of loader workers, and a resumed run starts at
  exactly the step where the interrupted one stopped. Under DDP each process takes its
  own slice of every step's images.
* :class:`MultiCropDataset` turns a sampled key into the image's views.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..errors import StoreError
from ..store import PatchStore, patch_reader

REAL, SYNTHETIC = 0, 1


class PatchSource:
    """All patches of a store's complete slides, as one indexable sequence of (S, S, 3) uint8 arrays."""

    def __init__(self, path: str | os.PathLike, kind: int = REAL) -> None:
        p = Path(path)
        if not p.exists():
            raise StoreError(f"{p}: no such patch store.")
        st = PatchStore(p)
        self.path, self.kind = p, kind
        self.patch_size, self.mpp = st.patch_size, st.mpp
        slides = [e for e in st.slides() if e.n_patches > 0]
        if not slides:
            raise StoreError(f"{p}: the patch store is empty (no completely tiled slide with patches).")
        self.slide_ids = [e.slide_id for e in slides]
        counts = np.array([e.n_patches for e in slides], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(counts)])
        self._readers: list | None = None  # opened lazily, per process

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_readers"] = None
        return d

    def locate(self, i: int) -> tuple[str, int]:
        s = int(np.searchsorted(self.offsets, i, side="right") - 1)
        return self.slide_ids[s], int(i - self.offsets[s])

    def _open(self) -> list:
        import zarr

        readers = []
        for sid in self.slide_ids:
            arr = zarr.open_array(str(self.path / "slides" / sid / "patches"), mode="r")
            readers.append(patch_reader(arr))
        return readers

    def read(self, i: int) -> np.ndarray:
        if self._readers is None:
            self._readers = self._open()
        s = int(np.searchsorted(self.offsets, i, side="right") - 1)
        return self._readers[s](int(i - self.offsets[s]))


def open_sources(real: Sequence[str], synthetic: Sequence[str], resize: bool = False) -> list[PatchSource]:
    """Open every store and check that they can be mixed (same patch size and µm/px, unless ``resize``)."""
    sources = [PatchSource(p, REAL) for p in real] + [PatchSource(p, SYNTHETIC) for p in synthetic]
    ref = sources[0]
    for s in sources[1:]:
        same_mpp = abs(s.mpp - ref.mpp) <= 1e-6 * max(1.0, ref.mpp)
        if resize:
            continue
        if not same_mpp:
            raise StoreError(
                f"{s.path}: its patches are at {s.mpp:g} µm/px but {ref.path}'s at {ref.mpp:g} µm/px; "
                "pass --resize to resample it, or use stores of one pixel size."
            )
        if s.patch_size != ref.patch_size:
            raise StoreError(
                f"{s.path}: its patches are {s.patch_size} px but {ref.path}'s are {ref.patch_size} px; "
                "pass --resize to mix them, or use stores of one patch size."
            )
    return sources


@dataclass
class HybridSampler:
    """Per-epoch plan of (source, index, augmentation seed), ``real_fraction`` of it real (see the module doc)."""

    sizes: Sequence[int]
    kinds: Sequence[int]
    real_fraction: float
    images_per_epoch: int
    batch_size: int
    seed: int = 0
    rank: int = 0
    world: int = 1
    epoch: int = 0
    start_step: int = 0

    @property
    def steps_per_epoch(self) -> int:
        return self.images_per_epoch // (self.batch_size * self.world)

    @property
    def n_used(self) -> int:
        return self.steps_per_epoch * self.batch_size * self.world

    def n_real(self) -> int:
        return int(round(self.real_fraction * self.n_used))

    def plan(self, epoch: int) -> np.ndarray:
        """(n_used, 3) int64 rows of (source, index, augmentation seed) for ``epoch``, identical on every rank."""
        rng = np.random.default_rng([self.seed, epoch, 7])
        n_real = self.n_real()
        parts = []
        for kind, n in ((REAL, n_real), (SYNTHETIC, self.n_used - n_real)):
            if n == 0:
                continue
            src = [i for i, k in enumerate(self.kinds) if k == kind]
            table = np.concatenate([np.stack([np.full(self.sizes[i], i), np.arange(self.sizes[i])], 1) for i in src])
            reps = -(-n // len(table))
            order = np.concatenate([rng.permutation(len(table)) for _ in range(reps)])[:n]
            parts.append(table[order])
        rows = np.concatenate(parts)
        rows = rows[rng.permutation(len(rows))]
        seeds = rng.integers(0, 2**62, size=len(rows))
        return np.concatenate([rows, seeds[:, None]], 1).astype(np.int64)

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.batch_size

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        plan = self.plan(self.epoch)
        b, w = self.batch_size, self.world
        for step in range(self.start_step, self.steps_per_epoch):
            lo = step * b * w + self.rank * b
            for row in plan[lo : lo + b]:
                yield int(row[0]), int(row[1]), int(row[2])


class MultiCropDataset:
    """key (source, index, seed) -> (views, kind, source); ``transform`` maps an (S, S, 3) uint8 patch to views."""

    def __init__(self, sources: Sequence[PatchSource], transform, ref_mpp: float | None = None) -> None:
        self.sources = list(sources)
        self.transform = transform
        ref = ref_mpp if ref_mpp is not None else self.sources[0].mpp
        self.scales = [s.mpp / ref for s in self.sources]

    def __getitem__(self, key):
        import torch

        src, idx, seed = key
        patch = self.sources[src].read(idx)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if abs(self.scales[src] - 1) > 1e-6:
                patch = _rescale(patch, self.scales[src])
            views = self.transform(patch)
        return views, self.sources[src].kind, src


def _rescale(patch: np.ndarray, scale: float) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    size = max(1, int(round(patch.shape[0] * scale)))
    t = torch.from_numpy(np.array(patch, dtype=np.uint8)).permute(2, 0, 1)[None].float()
    t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return t[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def _worker_init(_worker_id: int) -> None:
    import signal

    import torch

    torch.set_num_threads(1)
    # A SIGTERM or SIGINT sent to the whole process group (torchrun, `kill -- -PGID`, Ctrl-C
    # in a terminal) is for the training process, which stops after its step and shuts the
    # loader down; a worker dying first would turn a clean cancel into a loader error.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def make_loader(dataset: MultiCropDataset, sampler: HybridSampler, batch_size: int, workers: int,
                pin_memory: bool = False, seed: int = 0):
    """A DataLoader whose workers persist across epochs (change ``sampler.epoch``/``start_step`` between them)."""
    import torch
    from torch.utils.data import DataLoader

    g = torch.Generator()
    g.manual_seed(seed)  # the workers' base seed; never touches the global generator
    kw = {}
    if workers > 0:
        kw = dict(persistent_workers=True, prefetch_factor=4, worker_init_fn=_worker_init)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, pin_memory=pin_memory,
                      drop_last=False, generator=g, **kw)
