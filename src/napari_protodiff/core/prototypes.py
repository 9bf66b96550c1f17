"""Histological prototypes: k-means of patch embeddings, saved in the patch store.

Layout (see docs/patch-store.md, "Embeddings and prototypes")::

    prototypes/                      attrs["protodiff"] = {status, fit_id, k, seed, encoder, encoder_key,
                                      normalize, temperature, inertia, slides, n_patches, params, ...}
      centroids       (k, D) float32, in the normalised space
      center, scale   (D,) float32, the standardisation (0 and 1 when off)
      sizes           (k,) int64 patches per prototype
      shares          (S, k) float64 share of each slide's patches per prototype (rows: attrs slides)
      exemplar_slide  (k, E) int32 index into attrs slides (-1: none)
      exemplar_patch  (k, E) int64 patch index in that slide, nearest the centroid first
    slides/<id>/prototypes/          attrs["protodiff"] = {fit_id}
      labels (N,) int32, membership (N, k) float32, sqdist (N,) float32

``status`` is ``"fitting"`` until everything is written and ``"complete"`` after; a
complete set is replaced only with ``overwrite``. Soft membership is
``softmax(-d² / T)`` over prototypes, T = the mean squared distance of patches to
their own prototype unless given (see :mod:`.kmeans`).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from .embedding import read_embeddings, resolve_key
from .encoders.registry import Encoder, EncoderError, encoder_from_identity, same_encoder
from .errors import ProtodiffError, StoreError
from .kmeans import check_finite, kmeans_job, soft_membership, sqdist_matrix, silhouette
from .progress import CancelToken, Progress
from .store import PatchStore, now, versions

GROUP = "prototypes"
Normalize = Literal["auto", "none", "l2", "standardize", "standardize+l2"]


class PrototypeConfig(BaseModel):
    """Parameters of the prototype stage (shared by the API, ``protodiff prototypes`` and the widget)."""

    model_config = ConfigDict(extra="forbid")

    k: int = Field(16, ge=1, le=100_000, description="Number of prototypes.")
    seed: int = Field(0, ge=0, description="Random seed (same inputs and seed: same prototypes).")
    restarts: int = Field(3, ge=1, le=1000, description="k-means runs; the lowest inertia wins.")
    encoder: str | None = Field(None, description="Which embeddings (encoder key or name); the only set when empty.")
    normalize: Normalize = Field("auto", description="auto: standardize for the built-in encoder, l2 otherwise.")
    algorithm: Literal["auto", "lloyd", "minibatch"] = Field("auto", description="auto: Lloyd up to 100k patches.")
    max_iter: int = Field(100, ge=1, le=10_000)
    temperature: float | None = Field(None, gt=0, description="Soft-membership temperature (default: mean d²).")
    n_exemplars: int = Field(16, ge=0, le=1024, description="Exemplar patches kept per prototype.")
    device: str = Field("cpu", description="Device for k-means: cpu, cuda, mps or auto.")
    overwrite: bool = Field(False, description="Replace complete prototypes already in the store.")


@dataclass
class Prototypes:
    """A fitted prototype set, loaded from a store; assigns any embedding to it."""

    centroids: np.ndarray
    center: np.ndarray
    scale: np.ndarray
    l2: bool
    temperature: float
    encoder: dict[str, Any]
    encoder_key: str
    slides: list[str]
    sizes: np.ndarray
    shares: np.ndarray
    exemplar_slide: np.ndarray
    exemplar_patch: np.ndarray
    attrs: dict[str, Any] = field(default_factory=dict)

    @property
    def k(self) -> int:
        return int(self.centroids.shape[0])

    def transform(self, x: np.ndarray) -> np.ndarray:
        """Embeddings -> the space the centroids live in (standardise, then L2-normalise)."""
        return _transform(x, self.center, self.scale, self.l2)

    def assign(self, embeddings: np.ndarray, device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
        """(labels (N,) int32, membership (N, k) float32) of embeddings from this set's encoder."""
        x = np.asarray(embeddings, np.float32)
        if x.ndim != 2 or x.shape[1] != self.centroids.shape[1]:
            raise ProtodiffError(f"The embeddings have shape {x.shape}, but these prototypes need "
                                 f"(N, {self.centroids.shape[1]}) from encoder '{self.encoder_key}'.")
        check_finite(x)
        d = sqdist_matrix(self.transform(x), self.centroids, device=device)
        return d.argmin(1).astype(np.int32), soft_membership(d, self.temperature)

    def assign_patches(self, patches: np.ndarray, encoder: Encoder | None = None, batch_size: int = 128,
                       device: str = "auto") -> tuple[np.ndarray, np.ndarray]:
        """Embed uint8 patches (e.g. synthetic ones) with this set's encoder and assign them."""
        enc = encoder or encoder_from_identity(self.encoder, device=device)
        if not same_encoder(enc.identity(), self.encoder):
            raise EncoderError(f"Encoder '{enc.key}' is not the one these prototypes were fitted with ('{self.encoder_key}').")
        emb = np.concatenate([enc.encode(patches[i:i + batch_size]) for i in range(0, len(patches), batch_size)]) \
            if len(patches) else np.zeros((0, enc.dim), np.float32)
        return self.assign(emb)


@dataclass
class PrototypeResult:
    store: str
    k: int
    seed: int
    encoder_key: str
    n_patches: int
    inertia: float
    sizes: list[int]
    shares: dict[str, list[float]]
    seconds: float
    kmeans: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"store": self.store, "k": self.k, "seed": self.seed, "encoder_key": self.encoder_key,
                "n_patches": self.n_patches, "inertia": self.inertia, "sizes": self.sizes, "shares": self.shares,
                "seconds": round(self.seconds, 3), "kmeans": self.kmeans}


# -- reading ------------------------------------------------------------------------------
def prototype_status(store: PatchStore) -> str | None:
    if GROUP not in store.root:
        return None
    return dict(store.root[GROUP].attrs.get("protodiff", {})).get("status")


def load_prototypes(store: str | Path | PatchStore) -> Prototypes:
    """The store's complete prototype set; a one-sentence error if there is none."""
    st = store if isinstance(store, PatchStore) else PatchStore(store)
    status = prototype_status(st)
    if status is None:
        raise StoreError(f"{st.path}: the store has no prototypes; run protodiff prototypes first.")
    if status != "complete":
        raise StoreError(f"{st.path}: the store's prototypes are incomplete (an interrupted fit); "
                         "run protodiff prototypes again.")
    g = st.root[GROUP]
    a = dict(g.attrs["protodiff"])
    arr = {n: np.asarray(g[n][:]) for n in ("centroids", "center", "scale", "sizes", "shares",
                                            "exemplar_slide", "exemplar_patch")}
    return Prototypes(arr["centroids"], arr["center"], arr["scale"], bool(a["l2"]), float(a["temperature"]),
                      a["encoder"], a["encoder_key"], list(a["slides"]), arr["sizes"], arr["shares"],
                      arr["exemplar_slide"], arr["exemplar_patch"], a)


def slide_assignments(store: PatchStore, slide_id: str) -> tuple[np.ndarray, np.ndarray]:
    """(labels (N,) int32, membership (N, k) float32) of one slide's patches."""
    p = load_prototypes(store)
    entry = store.slide(slide_id)
    if slide_id not in p.slides or GROUP not in entry.group:
        raise StoreError(f"{store.path}: slide '{slide_id}' was not part of the prototype fit; "
                         "run protodiff prototypes --overwrite to include it.")
    g = entry.group[GROUP]
    if g.attrs.get("protodiff", {}).get("fit_id") != p.attrs.get("fit_id"):
        raise StoreError(f"{store.path}: the prototype labels of slide '{slide_id}' belong to another fit.")
    return np.asarray(g["labels"][:]), np.asarray(g["membership"][:])


# -- fitting ------------------------------------------------------------------------------
def _normalize_mode(cfg_mode: str, identity: dict[str, Any]) -> str:
    if cfg_mode != "auto":
        return cfg_mode
    return "standardize" if identity.get("kind") == "builtin" else "l2"


def _load_all(st: PatchStore, key: str) -> tuple[np.ndarray, list[str], np.ndarray]:
    parts, ids = [], []
    for e in st.slides():
        x = read_embeddings(st, e.slide_id, key)
        check_finite(x, f"the embeddings of slide '{e.slide_id}' (encoder '{key}')")
        parts.append(x)
        ids.append(e.slide_id)
    offsets = np.cumsum([0] + [len(p) for p in parts])
    return np.concatenate(parts), ids, offsets


def _transform(x: np.ndarray, center: np.ndarray, scale: np.ndarray, l2: bool) -> np.ndarray:
    z = (np.asarray(x, np.float32) - center) / scale
    if l2:
        z = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
    return z.astype(np.float32)


def _preprocess(x: np.ndarray, mode: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    d = x.shape[1]
    center, scale = np.zeros(d, np.float32), np.ones(d, np.float32)
    if mode.startswith("standardize"):
        center = x.mean(0, dtype=np.float64).astype(np.float32)
        sd = x.std(0, dtype=np.float64)
        scale = np.where(sd > 1e-8, sd, 1.0).astype(np.float32)
    l2 = mode.endswith("l2")
    return _transform(x, center, scale, l2), center, scale, l2


def fit_prototypes(store: str | Path, config: PrototypeConfig | None = None,
                   cancel: CancelToken | None = None) -> Iterator[Progress]:
    """Fit prototypes on the store's embeddings; a generator of progress events returning a :class:`PrototypeResult`."""
    cfg = config or PrototypeConfig()
    t0 = time.perf_counter()
    st = PatchStore(store, mode="r+")
    if prototype_status(st) == "complete" and not cfg.overwrite:
        a = st.root[GROUP].attrs["protodiff"]
        raise StoreError(f"{st.path}: the store already has prototypes (k = {a.get('k')}, encoder "
                         f"'{a.get('encoder_key')}'); pass --overwrite to replace them.")
    key, identity = resolve_key(st, cfg.encoder)
    yield Progress(0, 0, f"reading embeddings ({key})")
    x, ids, offsets = _load_all(st, key)
    n = len(x)
    if cfg.k > n:
        raise ProtodiffError(f"k = {cfg.k} is larger than the number of patches in {st.path} ({n}); choose k <= {n}.")
    mode = _normalize_mode(cfg.normalize, identity)
    z, center, scale, l2 = _preprocess(x, mode)
    from .encoders.registry import resolve_device

    device = resolve_device(cfg.device)
    res = yield from kmeans_job(z, cfg.k, cancel=cancel, seed=cfg.seed, restarts=cfg.restarts, algorithm=cfg.algorithm,
                                max_iter=cfg.max_iter, device=device)
    yield Progress(0, 0, "soft memberships and exemplars")
    temperature = float(cfg.temperature or (res.inertia / n if res.inertia > 0 else 1.0))
    membership = np.empty((n, cfg.k), np.float32)
    for s in range(0, n, 262_144):  # bounded memory for millions of patches
        membership[s:s + 262_144] = soft_membership(sqdist_matrix(z[s:s + 262_144], res.centroids, device=device),
                                                   temperature)
    labels, sqd = res.labels, res.sqdist
    sizes = np.bincount(labels, minlength=cfg.k).astype(np.int64)
    shares = np.stack([np.bincount(labels[offsets[i]:offsets[i + 1]], minlength=cfg.k) / max(1, offsets[i + 1] - offsets[i])
                       for i in range(len(ids))]).astype(np.float64)
    ex_slide, ex_patch = _exemplars(labels, sqd, offsets, cfg.k, cfg.n_exemplars)
    yield Progress(0, 0, "writing prototypes")
    fit_id = uuid.uuid4().hex
    attrs = {"status": "fitting", "fit_id": fit_id, "k": cfg.k, "seed": cfg.seed, "encoder": identity,
             "encoder_key": key, "normalize": mode, "l2": l2, "temperature": temperature, "inertia": res.inertia,
             "slides": ids, "n_patches": int(n), "params": cfg.model_dump(mode="json", exclude={"overwrite"}),
             "kmeans": res.to_dict(), "created": now(), "versions": versions()}
    _write(st, attrs, ids, offsets, labels, membership, sqd,
           {"centroids": res.centroids, "center": center, "scale": scale, "sizes": sizes, "shares": shares,
            "exemplar_slide": ex_slide, "exemplar_patch": ex_patch})
    return PrototypeResult(str(st.path), cfg.k, cfg.seed, key, int(n), res.inertia, sizes.tolist(),
                           {s: shares[i].round(6).tolist() for i, s in enumerate(ids)}, time.perf_counter() - t0,
                           res.to_dict())


def _exemplars(labels, sqd, offsets, k: int, e: int) -> tuple[np.ndarray, np.ndarray]:
    ex_slide = np.full((k, e), -1, np.int32)
    ex_patch = np.full((k, e), -1, np.int64)
    order = np.lexsort((np.arange(len(labels)), sqd, labels))  # by prototype, then distance, then index
    starts = np.searchsorted(labels[order], np.arange(k))
    for j in range(k):
        idx = order[starts[j]:starts[j] + e]
        idx = idx[labels[idx] == j]
        s = np.searchsorted(offsets, idx, side="right") - 1
        ex_slide[j, :len(idx)] = s
        ex_patch[j, :len(idx)] = idx - offsets[s]
    return ex_slide, ex_patch


def _write(st: PatchStore, attrs, ids, offsets, labels, membership, sqd, arrays) -> None:
    """Remove the old set, write the new one; ``status`` becomes complete last."""
    root = st.root
    if GROUP in root:
        del root[GROUP]
    for e in st.slides(complete_only=False):
        if GROUP in e.group:
            del e.group[GROUP]
    g = root.create_group(GROUP, overwrite=True)
    g.attrs["protodiff"] = attrs
    try:
        for i, sid in enumerate(ids):
            sg = st.slide(sid).group.create_group(GROUP, overwrite=True)
            sg.attrs["protodiff"] = {"fit_id": attrs["fit_id"]}
            s, e = int(offsets[i]), int(offsets[i + 1])
            rows = max(1, min(e - s, 65536))
            sg.create_array("labels", data=labels[s:e].astype(np.int32), chunks=(rows,))
            sg.create_array("membership", data=membership[s:e], chunks=(rows, membership.shape[1]))
            sg.create_array("sqdist", data=sqd[s:e].astype(np.float32), chunks=(rows,))
        for name, a in arrays.items():
            g.create_array(name, data=np.ascontiguousarray(a))
    except BaseException:
        if not isinstance(__import__("sys").exc_info()[1], (KeyboardInterrupt, GeneratorExit)):
            del root[GROUP]
        raise
    g.attrs["protodiff"] = dict(attrs, status="complete", finished=now())


# -- choosing k ---------------------------------------------------------------------------
def choose_k(store: str | Path, ks: Sequence[int], encoder: str | None = None, normalize: Normalize = "auto",
             seed: int = 0, sample_size: int = 20000, silhouette_sample: int = 4000,
             cancel: CancelToken | None = None) -> Iterator[Progress]:
    """Inertia and (sampled) silhouette for each k, to help choose it; returns a list of rows.

    Fits run on at most ``sample_size`` patches (drawn with ``seed``); nothing is written.
    """
    st = PatchStore(store)
    key, identity = resolve_key(st, encoder)
    x, _ids, _off = _load_all(st, key)
    if len(x) > sample_size:
        x = x[np.sort(np.random.default_rng(seed).choice(len(x), size=sample_size, replace=False))]
    z, *_ = _preprocess(x, _normalize_mode(normalize, identity))
    rows = []
    for i, k in enumerate(sorted(set(int(k) for k in ks))):
        if k > len(z):
            raise ProtodiffError(f"k = {k} is larger than the number of patches ({len(z)}); choose k <= {len(z)}.")
        yield Progress(i, len(ks), f"k = {k}")
        res = yield from kmeans_job(z, k, cancel=cancel, seed=seed)
        sil = silhouette(z, res.labels, sample_size=silhouette_sample, seed=seed) if k > 1 else float("nan")
        rows.append({"k": k, "inertia": res.inertia, "mean_sqdist": res.inertia / len(z), "silhouette": sil,
                     "n_patches": int(len(z)), "encoder_key": key})
    yield Progress(len(ks), len(ks), "done")
    return rows


# -- outputs --------------------------------------------------------------------------------
def exemplar_patches(store: str | Path | PatchStore, n: int | None = None) -> list[np.ndarray]:
    """For each prototype, its exemplar patches (E, S, S, 3) uint8, nearest the centroid first."""
    st = store if isinstance(store, PatchStore) else PatchStore(store)
    p = load_prototypes(st)
    s = st.patch_size
    rows = []
    for j in range(p.k):
        pats = [np.asarray(st.slide(p.slides[si]).group["patches"][int(pi)])
                for si, pi in zip(p.exemplar_slide[j][:n], p.exemplar_patch[j][:n]) if si >= 0]
        rows.append(np.stack(pats) if pats else np.zeros((0, s, s, 3), np.uint8))
    return rows


def prototype_table(store: str | Path | PatchStore) -> dict[str, np.ndarray]:
    """One row per patch: slide_id, patch, x, y (level 0), prototype, membership (of that prototype)."""
    st = store if isinstance(store, PatchStore) else PatchStore(store)
    p = load_prototypes(st)
    cols: dict[str, list[np.ndarray]] = {n: [] for n in ("slide_id", "patch", "x", "y", "prototype", "membership")}
    for sid in p.slides:
        labels, mem = slide_assignments(st, sid)
        xy = st.slide(sid).coords()
        cols["slide_id"].append(np.full(len(labels), sid, dtype=object))
        cols["patch"].append(np.arange(len(labels), dtype=np.int64))
        cols["x"].append(xy[:, 0])
        cols["y"].append(xy[:, 1])
        cols["prototype"].append(labels.astype(np.int32))
        cols["membership"].append(mem[np.arange(len(labels)), labels].astype(np.float32))
    return {k: np.concatenate(v) for k, v in cols.items()}


def write_table(store: str | Path | PatchStore, path: str | Path) -> Path:
    """Write :func:`prototype_table` as CSV (``.csv``) or Parquet (``.parquet``, needs pyarrow)."""
    out = Path(path)
    suffix = out.suffix.lower()
    if suffix not in (".csv", ".parquet"):
        raise ProtodiffError(f"{out}: the table must be a .csv or .parquet file.")
    table = prototype_table(store)
    tmp = out.with_name(f".{out.name}.tmp")
    if suffix == ".parquet":
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise ProtodiffError(f"{out}: writing Parquet needs pyarrow (pip install pyarrow); or use a .csv file.") from None
        pq.write_table(pa.table({k: (v.astype(str) if v.dtype == object else v) for k, v in table.items()}), tmp)
    else:
        import csv

        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(list(table))
            for row in zip(*(table[k].tolist() if k != "membership" else [f"{m:.6g}" for m in table[k]]
                             for k in table)):
                w.writerow(row)
    tmp.replace(out)
    return out
