"""The diffusion stage's one door to the prototypes stage (issue 3): labels, centroids, encoder.

Everything the diffusion code needs from prototypes goes through four functions:

* :func:`read_prototypes` - per-patch prototype labels (store order), centroids and the
  encoder's identity, from a patch store;
* :func:`encoder_for` - a callable ``images (N, H, W, 3) uint8 -> features (N, D)``
  for an encoder identity (the same one the prototypes were made with);
* :func:`assign_images` - re-assign (synthetic) images to the nearest centroid with
  that encoder: the prototype hit rate is measured with it;
* :func:`fit_prototypes` - make prototypes for a store (embed + k-means).

While the prototypes stage's own API (``core.prototypes`` / ``core.encoders``) is not
in the package, these fall back to a small built-in encoder (``colour-texture-v1``:
colour statistics, optical density, histograms and edge energy of the patch) and
:func:`napari_protodiff.core.kmeans.kmeans`, and keep the prototypes in the store's
``diffusion_prototypes`` group. Once that API lands, only this module changes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..store import PatchStore
from .errors import PrototypeError

FALLBACK_GROUP = "diffusion_prototypes"
BUILTIN_ENCODER = {"name": "colour-texture-v1", "kind": "builtin", "version": 1, "dim": 39, "input_size": 32}


@dataclass
class PrototypeSet:
    """Prototype assignments of a store's patches and the centroids they came from."""

    labels: np.ndarray
    """(N,) int32, one per patch of the store's complete slides, in store order."""
    centroids: np.ndarray
    """(K, D) float32 in the encoder's feature space."""
    encoder: dict[str, Any]
    """The encoder's identity (name, kind, version, ...); :func:`encoder_for` rebuilds it."""
    source: str = "fallback"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def k(self) -> int:
        return int(self.centroids.shape[0])

    def counts(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=self.k)


# -- the built-in encoder --------------------------------------------------------------------------
def _builtin_features(images: np.ndarray) -> np.ndarray:
    """39 colour/texture features of (N, H, W, 3) uint8 images, computed at 32 x 32 px."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    if x.shape[-1] != 32 or x.shape[-2] != 32:
        x = F.interpolate(x, size=(32, 32), mode="area")
    n = x.shape[0]
    flat = x.reshape(n, 3, -1)
    mean, std = flat.mean(-1), flat.std(-1)
    od = -torch.log(flat.clamp(min=1 / 255.0))
    od_mean, od_std = od.mean(-1), od.std(-1)
    bins = torch.linspace(0, 1, 9)[1:-1]
    hist = torch.stack([(flat <= b).float().mean(-1) for b in bins], -1).reshape(n, -1)  # (n, 3*7) CDF
    gray = x.mean(1, keepdim=True)
    gx = (gray[..., :, 1:] - gray[..., :, :-1]).abs().mean((1, 2, 3))
    gy = (gray[..., 1:, :] - gray[..., :-1, :]).abs().mean((1, 2, 3))
    sat = (x.max(1).values - x.min(1).values).reshape(n, -1)
    feats = torch.cat([mean, std, od_mean, od_std, hist, gx[:, None] * 4, gy[:, None] * 4,
                       sat.mean(-1, keepdim=True), sat.std(-1, keepdim=True), (sat > 0.15).float().mean(-1, keepdim=True),
                       (gray.reshape(n, -1) < 0.5).float().mean(-1, keepdim=True)], 1)
    return feats.numpy().astype(np.float32)


def encoder_for(identity: dict[str, Any]) -> Callable[[np.ndarray], np.ndarray]:
    """A callable embedding (N, H, W, 3) uint8 images with the encoder named by ``identity``."""
    if identity.get("name") == BUILTIN_ENCODER["name"]:
        def embed(images: np.ndarray, batch: int = 512) -> np.ndarray:
            return np.concatenate([_builtin_features(images[i:i + batch]) for i in range(0, len(images), batch)]) \
                if len(images) else np.zeros((0, BUILTIN_ENCODER["dim"]), np.float32)
        return embed
    try:  # the prototypes stage's encoders (issue 3), when present
        from .. import encoders as _enc  # type: ignore[attr-defined]
    except ImportError:
        _enc = None
    if _enc is not None and hasattr(_enc, "encoder_from_identity"):
        enc = _enc.encoder_from_identity(identity)
        return lambda images: np.asarray(enc(images), np.float32)
    raise PrototypeError(f"The encoder '{identity.get('name', '?')}' the prototypes were made with is not available "
                         "in this installation.")


def encoder_hash(identity: dict[str, Any]) -> str:
    return "sha256:" + hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


# -- reading, fitting, assigning ----------------------------------------------------------------
def read_prototypes(store: str | Path | PatchStore) -> PrototypeSet:
    """The store's prototypes; a one-sentence :class:`PrototypeError` if it has none."""
    st = store if isinstance(store, PatchStore) else PatchStore(store)
    n = int(sum(e.n_patches for e in st.slides()))
    if "prototypes" in st.root and _issue3_reader() is not None:
        ps = _issue3_reader()(st)
        if ps is not None:
            return ps
    if FALLBACK_GROUP not in st.root:
        raise PrototypeError(f"{st.path}: the store has no prototypes; run the prototypes stage on it first "
                             "(protodiff prototypes, or napari_protodiff.core.diffusion.fit_prototypes).")
    g = st.root[FALLBACK_GROUP]
    meta = dict(g.attrs.get("protodiff", {}))
    if meta.get("status") != "complete":
        raise PrototypeError(f"{st.path}: the store's prototypes were not completely written; make them again.")
    labels = np.asarray(g["labels"][:], np.int32)
    if len(labels) != n:
        raise PrototypeError(f"{st.path}: the prototypes cover {len(labels)} patches but the store has {n}; "
                             "make them again after tiling.")
    return PrototypeSet(labels, np.asarray(g["centroids"][:], np.float32), dict(meta["encoder"]), "fallback",
                        {"k": meta.get("k"), "seed": meta.get("seed")})


def _issue3_reader():
    """The prototypes stage's reader when it exists (``core.prototypes.read_prototypes``)."""
    try:
        from .. import prototypes as _p  # type: ignore[attr-defined]
    except ImportError:
        return None
    fn = getattr(_p, "read_prototypes", None) or getattr(_p, "load_prototypes", None)
    if fn is None:
        return None

    def read(st: PatchStore) -> PrototypeSet | None:
        try:
            res = fn(st.path)
        except Exception:
            return None
        labels = getattr(res, "labels", None)
        cents = getattr(res, "centroids", None)
        enc = getattr(res, "encoder", None) or getattr(res, "encoder_identity", None)
        if labels is None or cents is None or enc is None:
            return None
        return PrototypeSet(np.asarray(labels, np.int32), np.asarray(cents, np.float32),
                            dict(enc) if isinstance(enc, dict) else {"name": str(enc)}, "prototypes")
    return read


def store_patches(st: PatchStore, limit: int | None = None) -> np.ndarray:
    """All complete slides' patches (store order) as one in-memory uint8 array."""
    parts = [np.asarray(e.group["patches"][:]) for e in st.slides()]
    if not parts:
        raise PrototypeError(f"{st.path}: the store has no completely tiled slide.")
    out = np.concatenate(parts)
    return out[:limit] if limit else out


def fit_prototypes(store: str | Path, k: int, seed: int = 0, encoder: dict[str, Any] | None = None,
                   overwrite: bool = False) -> PrototypeSet:
    """Embed every patch with ``encoder`` (built-in by default), k-means into ``k`` prototypes, store them."""
    from ..kmeans import kmeans

    st = PatchStore(store, mode="r+")
    if FALLBACK_GROUP in st.root and not overwrite:
        try:
            return read_prototypes(st)
        except PrototypeError:
            pass
    identity = dict(encoder or BUILTIN_ENCODER)
    feats = encoder_for(identity)(store_patches(st))
    res = kmeans(feats, k, seed=seed, restarts=4)
    g = st.root.require_group(FALLBACK_GROUP)
    g.attrs["protodiff"] = {"status": "writing"}
    for name, arr in (("labels", res.labels.astype(np.int32)), ("centroids", res.centroids.astype(np.float32))):
        if name in g:
            del g[name]
        g.create_array(name, data=arr)
    g.attrs["protodiff"] = {"status": "complete", "k": int(k), "seed": int(seed), "encoder": identity,
                            "inertia": res.inertia}
    return PrototypeSet(res.labels.astype(np.int32), res.centroids, identity, "fallback", {"k": k, "seed": seed})


def embed_images(images: np.ndarray, identity: dict[str, Any]) -> np.ndarray:
    return encoder_for(identity)(np.asarray(images, np.uint8))


def assign_images(images: np.ndarray, pset: PrototypeSet) -> tuple[np.ndarray, np.ndarray]:
    """(labels (N,), features (N, D)) of ``images`` under ``pset``'s encoder and centroids."""
    from ..kmeans import assign

    feats = embed_images(images, pset.encoder)
    labels, _ = assign(feats, pset.centroids)
    return labels.astype(np.int32), feats
