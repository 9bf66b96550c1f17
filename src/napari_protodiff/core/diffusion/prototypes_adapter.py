"""The diffusion stage's one door to the prototypes stage (``core.prototypes``, ``core.encoders``).

Everything the diffusion code needs from prototypes goes through these functions:

* :func:`read_prototypes` - per-patch prototype labels (store order), centroids and the
  encoder's identity, from a patch store (``core.prototypes.load_prototypes`` and
  ``slide_assignments``);
* :func:`assign_images` - embed (synthetic) images with *the same* encoder and assign
  them to the nearest of *the same* centroids (``Prototypes.transform`` / ``assign``):
  the prototype hit rate is measured with it;
* :func:`make_prototypes` - embed a store and fit ``k`` prototypes (``embed_store`` +
  ``fit_prototypes``), for tests, the demo and scripts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..store import PatchStore
from .errors import PrototypeError


@dataclass
class PrototypeSet:
    """Prototype assignments of a store's patches and the prototype set they came from."""

    labels: np.ndarray
    """(N,) int32, one per patch of the store's complete slides, in store order."""
    centroids: np.ndarray
    """(K, D) float32 in the prototype space (the encoder's features after ``transform``)."""
    encoder: dict[str, Any]
    """The encoder's identity; ``core.encoders.encoder_from_identity`` rebuilds it."""
    prototypes: Any = None
    """The ``core.prototypes.Prototypes`` object (transform, assign)."""

    @property
    def k(self) -> int:
        return int(self.centroids.shape[0])

    def counts(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=self.k)


def read_prototypes(store: str | Path | PatchStore) -> PrototypeSet:
    """The store's prototypes; a one-sentence :class:`PrototypeError` if it has none."""
    from ..errors import StoreError
    from ..prototypes import load_prototypes, slide_assignments

    st = store if isinstance(store, PatchStore) else PatchStore(store)
    try:
        proto = load_prototypes(st)
        labels = [slide_assignments(st, e.slide_id)[0] for e in st.slides()]
    except StoreError as exc:
        raise PrototypeError(str(exc)) from None
    if not labels:
        raise PrototypeError(f"{st.path}: the store has no completely tiled slide.")
    return PrototypeSet(np.concatenate(labels).astype(np.int32), np.asarray(proto.centroids, np.float32),
                        dict(proto.encoder), proto)


def store_patches(st: PatchStore, limit: int | None = None) -> np.ndarray:
    """All complete slides' patches (store order) as one in-memory uint8 array."""
    parts = [np.asarray(e.group["patches"][:]) for e in st.slides()]
    if not parts:
        raise PrototypeError(f"{st.path}: the store has no completely tiled slide.")
    out = np.concatenate(parts)
    return out[:limit] if limit else out


def make_prototypes(store: str | Path, k: int, seed: int = 0, encoder: str | None = None,
                    overwrite: bool = False) -> PrototypeSet:
    """Embed the store (built-in encoder unless named) and fit ``k`` prototypes; returns them."""
    from ..embedding import EmbedConfig, embed_store
    from ..progress import drain
    from ..prototypes import PrototypeConfig, fit_prototypes

    drain(embed_store(store, EmbedConfig(encoder=encoder, device="cpu")))
    drain(fit_prototypes(store, PrototypeConfig(k=k, seed=seed, encoder=encoder, overwrite=overwrite)))
    return read_prototypes(store)


def _encoder(identity: dict[str, Any]):
    from ..encoders.registry import encoder_from_identity

    return encoder_from_identity(identity, device="auto")


def assign_images(images: np.ndarray, pset: PrototypeSet, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(labels (N,), features (N, D) in the prototype space) of uint8 ``images`` under ``pset``."""
    images = np.asarray(images, np.uint8)
    if pset.prototypes is None:
        raise PrototypeError("These prototypes cannot assign new images (no prototype set attached).")
    enc = _encoder(pset.encoder)
    emb = np.concatenate([enc.encode(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]) \
        if len(images) else np.zeros((0, enc.dim), np.float32)
    labels, _ = pset.prototypes.assign(emb)
    return labels.astype(np.int32), np.asarray(pset.prototypes.transform(emb), np.float32)
