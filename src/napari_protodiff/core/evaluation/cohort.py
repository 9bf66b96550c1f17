"""Cohort CSVs and the slide bags they describe.

A cohort CSV has one row per slide with columns ``slide`` (the slide's path, relative to
the CSV's folder or absolute, or its id in the patch store), ``patient``, and ``label``
and/or ``time`` and ``event`` (1 = event, 0 = censored); an optional ``fold`` column
fixes the cross-validation folds (a patient must then stay in one fold).

Each slide must already be tiled into the patch store (``protodiff tile``); its bag is
the slide's patches embedded with the chosen encoder, reusing complete embeddings in
the store and computing (and storing) missing ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..progress import CancelToken, Progress
from .errors import EvaluationError
from .mil import Bag


@dataclass
class CohortRow:
    line: int
    slide: str
    patient: str
    label: str | None
    time: float | None
    event: int | None
    fold: int | None


def read_cohort(path: str | Path) -> list[CohortRow]:
    """Parse and check a cohort CSV; one sentence naming the file and line on bad input."""
    import pandas as pd

    p = Path(path)
    if not p.is_file():
        raise EvaluationError(f"{p}: no such cohort CSV.")
    try:
        df = pd.read_csv(p, sep=None, engine="python", dtype=str, keep_default_na=False)
    except Exception as exc:  # noqa: BLE001
        raise EvaluationError(f"{p}: cannot be read as a CSV ({exc}).") from None
    df.columns = [str(c).strip().lower() for c in df.columns]
    missing = [c for c in ("slide", "patient") if c not in df.columns]
    has_label = "label" in df.columns
    has_surv = "time" in df.columns and "event" in df.columns
    if missing:
        raise EvaluationError(f"{p}: missing column(s) {', '.join(missing)} (a cohort needs slide, patient, "
                              "and label and/or time and event).")
    if not has_label and not has_surv:
        half = [c for c in ("time", "event") if c in df.columns]
        extra = f" (it has {half[0]} but not {'event' if half[0] == 'time' else 'time'})" if half else ""
        raise EvaluationError(f"{p}: missing outcome columns: a cohort needs label, or time and event{extra}.")
    if len(df) == 0:
        raise EvaluationError(f"{p}: the cohort has no rows.")
    rows, seen = [], {}
    for i, r in enumerate(df.to_dict("records")):
        line = i + 2
        slide, patient = str(r["slide"]).strip(), str(r["patient"]).strip()
        if not slide or not patient:
            raise EvaluationError(f"{p}: line {line} has an empty slide or patient.")
        if slide in seen:
            raise EvaluationError(f"{p}: slide '{slide}' is listed twice (lines {seen[slide]} and {line}).")
        seen[slide] = line
        label = str(r["label"]).strip() or None if has_label else None
        time = event = None
        if has_surv and (str(r["time"]).strip() or str(r["event"]).strip()):
            time = _number(p, line, "time", r["time"])
            if time < 0:
                raise EvaluationError(f"{p}: line {line} has a negative time ({time:g}).")
            ev = _number(p, line, "event", r["event"])
            if ev not in (0, 1):
                raise EvaluationError(f"{p}: line {line} has event {r['event']!r}; use 1 for an event and 0 for censored.")
            event = int(ev)
        fold = None
        if "fold" in df.columns and str(r["fold"]).strip():
            fold = int(_number(p, line, "fold", r["fold"]))
        rows.append(CohortRow(line, slide, patient, label, time, event, fold))
    folds: dict[str, tuple[int, int]] = {}
    for r in rows:
        if r.fold is None:
            continue
        f, line = folds.setdefault(r.patient, (r.fold, r.line))
        if f != r.fold:
            raise EvaluationError(f"{p}: patient '{r.patient}' is in fold {f} (line {line}) and fold {r.fold} "
                                  f"(line {r.line}); a patient must stay in one fold.")
    return rows


def _number(p: Path, line: int, col: str, value: Any) -> float:
    try:
        v = float(str(value).strip())
    except ValueError:
        raise EvaluationError(f"{p}: line {line} has {col} {value!r}, which is not a number.") from None
    if not np.isfinite(v):
        raise EvaluationError(f"{p}: line {line} has {col} {value!r}, which is not a finite number.")
    return v


def match_slides(rows: list[CohortRow], store, cohort_path: str | Path) -> list[str]:
    """The store's slide id of each cohort row (by source path, slide id or file stem)."""
    from ..store import slide_id_from_path

    base = Path(cohort_path).parent
    by_path: dict[str, str] = {}
    for e in store.slides(complete_only=False):
        a = e.attrs
        if a.get("path"):
            by_path[str(Path(a["path"]).resolve())] = e.slide_id
    ids = set(store.slide_ids)
    out = []
    for r in rows:
        cand = Path(r.slide).expanduser()
        cand = cand if cand.is_absolute() else base / cand
        sid = by_path.get(str(cand.resolve())) if cand.exists() else None
        if sid is None and r.slide in ids:
            sid = r.slide
        if sid is None and slide_id_from_path(r.slide) in ids:
            sid = slide_id_from_path(r.slide)
        if sid is None:
            raise EvaluationError(f"{cohort_path}: slide '{r.slide}' (line {r.line}) is not in the patch store "
                                  f"{store.path}; tile it first with protodiff tile.")
        if not store.slide(sid).complete:
            raise EvaluationError(f"{cohort_path}: slide '{r.slide}' (line {r.line}) is not completely tiled in "
                                  f"{store.path}; run protodiff tile again to finish it.")
        out.append(sid)
    dup = {s for s in out if out.count(s) > 1}
    if dup:
        raise EvaluationError(f"{cohort_path}: several rows name the same slide '{sorted(dup)[0]}' of the store.")
    return out


def cohort_bags(cohort: str | Path, store: str | Path, encoder=None, encoder_name: str | None = None,
                device: str = "auto", batch_size: int = 128,
                cancel: CancelToken | None = None) -> Iterator[Progress]:
    """Bags of a cohort's slides (a generator of progress returning ``(bags, encoder identity)``)."""
    from ..embedding import EmbedConfig, embed_store, embedding_attrs, read_embeddings
    from ..encoders import load_encoder
    from ..store import PatchStore

    rows = read_cohort(cohort)
    st = PatchStore(store)
    ids = match_slides(rows, st, cohort)
    yield Progress(0, 0, "loading the encoder")
    enc = encoder or load_encoder(encoder_name, device=device)
    missing = [s for s in ids if (embedding_attrs(st.slide(s), enc.key) or {}).get("status") != "complete"]
    if missing:
        yield from embed_store(st.path, EmbedConfig(slides=missing, batch_size=batch_size, device=device), cancel=cancel,
                               encoder=enc)
        st = PatchStore(store)
    bags = []
    for r, sid in zip(rows, ids):
        e = st.slide(sid)
        x = read_embeddings(st, sid, enc.key)
        a = e.attrs
        bags.append(Bag(sid, r.patient, x, e.coords(), r.label, r.time, r.event, r.fold,
                        meta={"slide_path": a.get("path"), "footprint_level0": a.get("footprint_level0"),
                              "slide_mpp": a.get("slide_mpp"), "patch_mpp": a.get("patch_mpp"), "line": r.line}))
    return bags, enc.identity()
