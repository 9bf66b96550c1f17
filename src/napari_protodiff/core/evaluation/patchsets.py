"""Labelled patch sets for the patch-level probes, and their features from an encoder.

A labelled patch set is one of:

- a folder with one sub-folder per class, holding image files (each patch its own group);
- a CSV with columns ``path`` and ``label`` and optionally ``group`` (slide, patient...),
  paths relative to the CSV's folder;
- a labelled patch store: every slide has ``attrs["protodiff"]["label"]`` (all its
  patches get it) or a per-patch ``labels`` array; the group is the slide.

Features come from any encoder of the registry (:func:`~napari_protodiff.core.encoders.load_encoder`);
for a store, complete embeddings already in it from the same encoder are reused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..progress import CancelToken, Progress
from .errors import EvaluationError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")


@dataclass
class PatchSet:
    """Labelled patches: ``images[i]`` (a path or an index into ``store``) with ``labels[i]`` and ``groups[i]``."""

    source: str
    kind: str  # folder | csv | store
    items: list
    labels: np.ndarray
    groups: np.ndarray
    store: object | None = None
    slide_of: np.ndarray | None = None

    @property
    def classes(self) -> list[str]:
        return sorted(set(self.labels.tolist()))

    def __len__(self) -> int:
        return len(self.labels)


def load_patch_set(source: str | Path) -> PatchSet:
    """Read a labelled patch set (class folders, CSV or labelled patch store); one sentence on bad input."""
    from ..store import PatchStore

    p = Path(source)
    if not p.exists():
        raise EvaluationError(f"{p}: no such patch folder, CSV or patch store.")
    if p.is_dir() and PatchStore.is_store(p):
        return _from_store(PatchStore(p))
    if p.is_dir():
        return _from_folders(p)
    if p.suffix.lower() in (".csv", ".tsv", ".txt"):
        return _from_csv(p)
    raise EvaluationError(f"{p}: not a folder of class folders, a CSV (path,label[,group]) or a patch store.")


def _from_folders(root: Path) -> PatchSet:
    items, labels = [], []
    for d in sorted(x for x in root.iterdir() if x.is_dir()):
        files = sorted(f for f in d.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        items += files
        labels += [d.name] * len(files)
    if not items:
        raise EvaluationError(f"{root}: no class sub-folders with images ({', '.join(IMAGE_SUFFIXES)}) found.")
    labels = np.array(labels, dtype=object)
    return _checked(PatchSet(str(root), "folder", items, labels, np.array([str(x) for x in items], dtype=object)))


def _from_csv(path: Path) -> PatchSet:
    import pandas as pd

    try:
        df = pd.read_csv(path, sep=None, engine="python", dtype=str)
    except Exception as exc:  # noqa: BLE001 - any parse failure is the user's file
        raise EvaluationError(f"{path}: cannot be read as a CSV ({exc}).") from None
    df.columns = [str(c).strip().lower() for c in df.columns]
    missing = [c for c in ("path", "label") if c not in df.columns]
    if missing:
        raise EvaluationError(f"{path}: missing column(s) {', '.join(missing)} (needs path, label and optionally group).")
    if df["path"].isna().any() or df["label"].isna().any():
        row = int(np.flatnonzero(df["path"].isna() | df["label"].isna())[0]) + 2
        raise EvaluationError(f"{path}: line {row} has an empty path or label.")
    items = [(path.parent / str(x).strip()).resolve() for x in df["path"]]
    for i, f in enumerate(items):
        if not f.is_file():
            raise EvaluationError(f"{path}: line {i + 2} names {f}, which does not exist.")
    groups = df["group"].fillna("").astype(str).to_numpy(object) if "group" in df.columns else np.array(
        [str(x) for x in items], dtype=object)
    if "group" in df.columns and (groups == "").any():
        raise EvaluationError(f"{path}: line {int(np.flatnonzero(groups == '')[0]) + 2} has an empty group.")
    return _checked(PatchSet(str(path), "csv", items, df["label"].str.strip().to_numpy(object), groups))


def _from_store(st) -> PatchSet:
    items, labels, groups, slides = [], [], [], []
    for e in st.slides():
        n = e.n_patches
        if "labels" in e.group:
            lab = np.asarray(e.group["labels"][:]).astype(str)
            if len(lab) != n:
                raise EvaluationError(f"{st.path}: slide '{e.slide_id}' has {len(lab)} labels for {n} patches.")
        elif e.attrs.get("label") is not None:
            lab = np.array([str(e.attrs["label"])] * n)
        else:
            raise EvaluationError(f"{st.path}: slide '{e.slide_id}' has no label (attrs 'label' or a 'labels' array); "
                                  "the store is not a labelled patch set.")
        items += list(range(n))
        labels += lab.tolist()
        groups += [e.slide_id] * n
        slides += [e.slide_id] * n
    if not items:
        raise EvaluationError(f"{st.path}: the store has no completely tiled slide.")
    return _checked(PatchSet(str(st.path), "store", items, np.array(labels, dtype=object), np.array(groups, dtype=object),
                             store=st, slide_of=np.array(slides, dtype=object)))


def _checked(ps: PatchSet) -> PatchSet:
    if len(ps.classes) < 2:
        raise EvaluationError(f"{ps.source}: every patch has the label '{ps.classes[0]}'; a probe needs two classes or more.")
    return ps


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except Exception as exc:  # noqa: BLE001
        raise EvaluationError(f"{path}: cannot be read as an image ({exc}).") from None


def encode_images(enc, images: Sequence[np.ndarray], batch_size: int = 64,
                  cancel: CancelToken | None = None) -> Iterator[Progress | np.ndarray]:
    """Encode images (of any sizes: batched by size), yielding progress; returns (N, D) float32."""
    n = len(images)
    out = np.zeros((n, enc.dim), np.float32)
    by_shape: dict[tuple, list[int]] = {}
    for i, im in enumerate(images):
        by_shape.setdefault(im.shape, []).append(i)
    done = 0
    for idx in by_shape.values():
        for s in range(0, len(idx), batch_size):
            if cancel is not None:
                cancel.raise_if_cancelled()
            b = idx[s:s + batch_size]
            out[b] = enc.encode(np.stack([images[i] for i in b]))
            done += len(b)
            yield Progress(done, n, f"encoding patches with {enc.name}")
    return out


def patch_set_features(ps: PatchSet, enc, batch_size: int = 64, cancel: CancelToken | None = None):
    """Features of every patch of ``ps`` with encoder ``enc`` (a generator of progress returning (N, D))."""
    if ps.kind == "store":
        from ..embedding import embedding_attrs, read_embeddings

        feats = []
        for sid in dict.fromkeys(ps.slide_of.tolist()):
            e = ps.store.slide(sid)
            a = embedding_attrs(e, enc.key) or {}
            if a.get("status") == "complete":
                feats.append(read_embeddings(ps.store, sid, enc.key))
                continue
            pix = np.asarray(e.patches().compute())
            f = yield from encode_images(enc, list(pix), batch_size, cancel)
            feats.append(f)
        x = np.concatenate(feats)
    else:
        images = [_read_image(p) for p in ps.items]
        x = yield from encode_images(enc, images, batch_size, cancel)
    check_features(x, ps.source)
    return x


def check_features(x: np.ndarray, source: str) -> None:
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        raise EvaluationError(f"{source}: {int(bad.sum())} patch feature vector(s) contain NaN or infinite values "
                              f"(first: patch {int(np.flatnonzero(bad)[0])}); check the encoder and its weights.")
