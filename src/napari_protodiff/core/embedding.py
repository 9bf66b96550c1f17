"""Embed a patch store's patches with an encoder, into the store, resumably.

Layout added to each slide's group (see docs/patch-store.md, "Embeddings and prototypes")::

    slides/<id>/embeddings/<encoder_key>/   attrs["protodiff"] = {status, encoder (identity), n_patches, dim, chunk_rows, ...}
        vectors     (N, D) float32, chunks of ``chunk_rows`` rows
        chunk_done  (C,) uint8, 1 once rows ``c*chunk_rows : (c+1)*chunk_rows`` are written

Patches are read chunk by chunk (the next chunk is read while the current one is
encoded), encoded in batches on the chosen device, written, and the chunk is marked
done; a slide's status becomes ``"complete"`` only when every chunk is. An
interrupted run (cancel, Ctrl-C, a crash) leaves ``"embedding"`` and the next run with
the same encoder resumes at the first unwritten chunk. Complete embeddings are never
replaced unless ``overwrite`` is set.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from .encoders.registry import Encoder, load_encoder, same_encoder
from .errors import StoreError
from .progress import CancelToken, Progress
from .store import PatchStore, SlideEntry, now, versions

GROUP = "embeddings"


class EmbedConfig(BaseModel):
    """Parameters of the embedding stage (shared by the API, ``protodiff embed`` and the widget)."""

    model_config = ConfigDict(extra="forbid")

    encoder: str | None = Field(None, description="Encoder name or path; the built-in encoder when empty.")
    arch: str | None = Field(None, description="timm architecture of a weights file.")
    weights: str | None = Field(None, description="Weights file of a named encoder (uni, phikon, ...).")
    input_size: int | None = Field(None, ge=8, le=4096, description="Input side (px) of a timm model, if not its default.")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N or mps.")
    batch_size: int = Field(128, ge=1, le=65536, description="Patches per forward pass.")
    chunk_rows: int = Field(1024, ge=1, le=1 << 20, description="Rows per stored chunk (the unit of resume).")
    slides: list[str] | None = Field(None, description="Slide ids to embed (default: every complete slide).")
    overwrite: bool = Field(False, description="Recompute complete embeddings from the same encoder.")


@dataclass
class EmbedResult:
    store: str
    encoder: dict[str, Any]
    key: str
    device: str
    slides: list[dict[str, Any]]
    seconds: float
    patches_embedded: int
    warnings: list[str] = field(default_factory=list)

    @property
    def patches_per_second(self) -> float:
        return self.patches_embedded / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"store": self.store, "encoder": self.encoder, "key": self.key, "device": self.device,
                "slides": self.slides, "seconds": round(self.seconds, 3), "patches_embedded": self.patches_embedded,
                "patches_per_second": round(self.patches_per_second, 1), "warnings": self.warnings}


# -- reading ------------------------------------------------------------------------------
def _group(entry: SlideEntry, key: str):
    g = entry.group
    if GROUP not in g or key not in g[GROUP]:
        return None
    return g[GROUP][key]


def embedding_attrs(entry: SlideEntry, key: str) -> dict[str, Any] | None:
    g = _group(entry, key)
    return None if g is None else dict(g.attrs.get("protodiff", {}))


def embedding_keys(store: PatchStore, complete_only: bool = True) -> dict[str, dict[str, Any]]:
    """Encoder key -> identity, for encoders whose embeddings are complete on every complete slide."""
    slides = store.slides()
    found: dict[str, dict[str, Any]] = {}
    counts: dict[str, int] = {}
    for e in slides:
        g = e.group
        if GROUP not in g:
            continue
        for key in sorted(g[GROUP].group_keys()):
            a = embedding_attrs(e, key) or {}
            if complete_only and a.get("status") != "complete":
                continue
            found.setdefault(key, a.get("encoder", {}))
            counts[key] = counts.get(key, 0) + 1
    return {k: v for k, v in found.items() if not complete_only or counts[k] == len(slides)}


def read_embeddings(store: PatchStore, slide_id: str, key: str) -> np.ndarray:
    """(N, D) float32 embeddings of one slide; a one-sentence error if they are missing or incomplete."""
    entry = store.slide(slide_id)
    a = embedding_attrs(entry, key)
    if a is None:
        raise StoreError(f"{store.path}: slide '{slide_id}' has no embeddings from encoder '{key}'; run protodiff embed first.")
    if a.get("status") != "complete":
        raise StoreError(f"{store.path}: the embeddings of slide '{slide_id}' from encoder '{key}' are incomplete; "
                         "run protodiff embed again to finish them.")
    return np.asarray(_group(entry, key)["vectors"][:], dtype=np.float32)


def resolve_key(store: PatchStore, encoder: str | None) -> tuple[str, dict[str, Any]]:
    """The embeddings to use: ``encoder`` given as a key or encoder name, or the only complete set."""
    if not store.slides():
        raise StoreError(f"{store.path}: the store has no completely tiled slide; tile slides into it first.")
    keys = embedding_keys(store)
    if not keys:
        raise StoreError(f"{store.path}: the store has no complete embeddings; run protodiff embed first.")
    if encoder is None:
        if len(keys) > 1:
            raise StoreError(f"{store.path}: the store has embeddings from several encoders ({', '.join(keys)}); "
                             "choose one with --encoder.")
        key = next(iter(keys))
        return key, keys[key]
    if encoder in keys:
        return encoder, keys[encoder]
    named = [k for k, ident in keys.items() if ident.get("name") == encoder]
    if len(named) == 1:
        return named[0], keys[named[0]]
    raise StoreError(f"{store.path}: no complete embeddings from encoder '{encoder}' on every slide "
                     f"(it has: {', '.join(keys)}).")


# -- writing ------------------------------------------------------------------------------
@dataclass
class _Plan:
    entry: SlideEntry
    action: str  # new | resume | skip | overwrite
    todo: list[int]
    n_chunks: int


def _create(entry: SlideEntry, key: str, enc: Encoder, chunk_rows: int):
    n = entry.n_patches
    g = entry.group.require_group(GROUP).create_group(key, overwrite=True)
    n_chunks = max(1, -(-n // chunk_rows))
    g.attrs["protodiff"] = {"status": "embedding", "encoder": enc.identity(), "key": key, "n_patches": n,
                            "dim": int(enc.dim), "chunk_rows": int(chunk_rows), "started": now(), "versions": versions()}
    g.create_array("vectors", shape=(n, enc.dim), chunks=(min(max(n, 1), chunk_rows), enc.dim), dtype="float32",
                   fill_value=np.nan, dimension_names=("patch", "feature"))
    g.create_array("chunk_done", shape=(n_chunks,), chunks=(1,), dtype="uint8", fill_value=0)
    return n_chunks


def _plan(entry: SlideEntry, key: str, enc: Encoder, cfg: EmbedConfig) -> _Plan:
    a = embedding_attrs(entry, key)
    n_chunks = max(1, -(-entry.n_patches // cfg.chunk_rows))
    if a is not None and a.get("status") == "complete":
        if not cfg.overwrite:
            return _Plan(entry, "skip", [], n_chunks)
        return _Plan(entry, "overwrite", list(range(n_chunks)), n_chunks)
    if a is not None and same_encoder(a.get("encoder", {}), enc.identity()) and a.get("chunk_rows") == cfg.chunk_rows \
            and a.get("n_patches") == entry.n_patches:
        done = np.asarray(_group(entry, key)["chunk_done"][:]).astype(bool)
        return _Plan(entry, "resume", [int(c) for c in np.flatnonzero(~done)], n_chunks)
    return _Plan(entry, "new", list(range(n_chunks)), n_chunks)


def embed_store(
    store: str | Path,
    config: EmbedConfig | None = None,
    cancel: CancelToken | None = None,
    encoder: Encoder | None = None,
) -> Iterator[Progress]:
    """Embed the store's patches; a generator of progress events returning an :class:`EmbedResult`.

    ``encoder`` (an :class:`Encoder` already built, e.g. by a widget) takes precedence
    over ``config.encoder``.
    """
    cfg = config or EmbedConfig()
    st = PatchStore(store, mode="r+")
    if cfg.slides:
        entries = [st.slide(s) for s in cfg.slides]
        for e in entries:
            if not e.complete:
                raise StoreError(f"{st.path}: slide '{e.slide_id}' is not completely tiled; finish tiling it first.")
    else:
        entries = st.slides()
    if not entries:
        raise StoreError(f"{st.path}: the store has no completely tiled slide; tile slides into it first.")
    yield Progress(0, 0, "loading the encoder")
    enc = encoder or load_encoder(cfg.encoder, arch=cfg.arch, weights=cfg.weights, device=cfg.device,
                                  **({"input_size": cfg.input_size} if cfg.input_size else {}))
    key = enc.key
    warnings = []
    if enc.mpp and abs(st.mpp - enc.mpp) / enc.mpp > 0.1:
        warnings.append(f"encoder '{enc.name}' expects {enc.mpp:g} µm/px but the store's patches are {st.mpp:g} µm/px")
    plans = [_plan(e, key, enc, cfg) for e in entries]
    if all(p.action == "skip" for p in plans):
        raise StoreError(f"{st.path}: every slide already has complete embeddings from encoder '{key}'; "
                         "pass --overwrite to compute them again.")
    for p in plans:
        if p.action in ("new", "overwrite"):
            _create(p.entry, key, enc, cfg.chunk_rows)
    units = [(p, c) for p in plans for c in p.todo]
    total = sum(min(cfg.chunk_rows, p.entry.n_patches - c * cfg.chunk_rows) for p, c in units)
    yield Progress(0, total, f"embedding {total} patches with {enc.name} on {enc.device}")
    done_rows, t0 = 0, time.perf_counter()
    last_unit = {id(p): i for i, (p, _c) in enumerate(units)}

    def read(unit):
        p, c = unit
        s = c * cfg.chunk_rows
        return np.asarray(p.entry.group["patches"][s:min(p.entry.n_patches, s + cfg.chunk_rows)])

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="protodiff-read")
    try:
        nxt = pool.submit(read, units[0]) if units else None
        for i, (p, c) in enumerate(units):
            if cancel is not None:
                cancel.raise_if_cancelled()
            pix = nxt.result()
            nxt = pool.submit(read, units[i + 1]) if i + 1 < len(units) else None
            vec = np.concatenate([enc.encode(pix[b:b + cfg.batch_size]) for b in range(0, len(pix), cfg.batch_size)])
            g = _group(p.entry, key)
            s = c * cfg.chunk_rows
            g["vectors"][s:s + len(vec)] = vec
            g["chunk_done"][c] = 1
            done_rows += len(vec)
            rate = done_rows / max(1e-9, time.perf_counter() - t0)
            if last_unit[id(p)] == i:
                _finish(p, key)
            yield Progress(done_rows, total, f"{done_rows}/{total} patches ({p.entry.slide_id})",
                           {"patches_per_second": rate})
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    for p in plans:
        if p.action == "resume" and not p.todo:
            _finish(p, key)
    seconds = time.perf_counter() - t0
    slides_out = [{"slide_id": p.entry.slide_id, "action": p.action, "n_patches": p.entry.n_patches,
                   "chunks_written": len(p.todo)} for p in plans]
    return EmbedResult(str(st.path), enc.identity(), key, enc.device, slides_out, seconds, done_rows, warnings)


def _finish(p: _Plan, key: str) -> None:
    g = _group(p.entry, key)
    if not np.asarray(g["chunk_done"][:]).all():
        return
    vec = g["vectors"]
    a = dict(g.attrs["protodiff"])
    bad = 0
    for s in range(0, vec.shape[0], 65536):
        v = np.asarray(vec[s:s + 65536])
        bad += int((~np.isfinite(v)).any(axis=1).sum())
    a.update(status="complete", finished=now(), nonfinite_rows=bad)
    g.attrs["protodiff"] = a
