"""Patient-grouped k-fold cross-validation of ABMIL on slide bags, with attention per patch.

Every slide is a :class:`Bag` of patch features. Folds are split by patient (all
slides of a patient in one fold; classification stratified by label, survival by
event), one model is trained per fold on the other folds, and each slide gets an
out-of-fold prediction and an attention score per patch. Metrics on the pooled
out-of-fold predictions: AUC, balanced accuracy and macro-F1 (classification), C-index
(survival; Cox risks are standardised within each fold before pooling), each with a
bootstrap CI over patients; for survival also Kaplan-Meier curves of the low and high
predicted-risk halves with a log-rank test.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ..progress import CancelToken, Progress
from .errors import EvaluationError
from .metrics import CI, c_index, classification_cis, survival_cis
from .probe import check_grouping, grouped_folds
from .stats import logrank, risk_groups


class MILConfig(BaseModel):
    """Parameters of ``protodiff evaluate mil`` (API, CLI and widget)."""

    model_config = ConfigDict(extra="forbid")

    task: Literal["auto", "classification", "survival"] = Field("auto", description="auto: classification when the cohort has labels.")
    loss: Literal["nll", "cox"] = Field("nll", description="Survival loss: discrete-time hazard NLL or Cox partial likelihood.")
    folds: int = Field(5, ge=2, le=50, description="Cross-validation folds, split by patient.")
    epochs: int = Field(40, ge=1, le=10000)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    hidden: int = Field(128, ge=4, le=4096)
    attn_dim: int = Field(64, ge=4, le=4096)
    dropout: float = Field(0.1, ge=0, lt=1)
    n_bins: int = Field(4, ge=2, le=50, description="Time bins of the discrete-time hazard.")
    batch_bags: int = Field(16, ge=2, le=4096, description="Bags per optimisation step (a Cox risk set).")
    max_patches: int = Field(1024, ge=1, description="Patches sampled per bag and step in training (all at test).")
    n_boot: int = Field(1000, ge=0, le=100000)
    device: str = Field("cpu", description="cpu, cuda, cuda:N, mps or auto.")
    seed: int = 0


@dataclass
class Bag:
    """One slide: its patch features, their level-0 coordinates and the slide's outcome."""

    slide_id: str
    patient: str
    features: np.ndarray
    coords: np.ndarray | None = None
    label: str | None = None
    time: float | None = None
    event: int | None = None
    fold: int | None = None
    """A fold fixed by the cohort (optional)."""
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class MILResult:
    task: str
    loss: str | None
    classes: list[str]
    slides: list[str]
    patients: list[str]
    fold: np.ndarray
    predictions: np.ndarray
    """(n_slides, C) class probabilities or (n_slides,) risks (higher = earlier event)."""
    attention: list[np.ndarray]
    metrics: dict[str, CI]
    fold_metrics: list[dict[str, float]]
    y: np.ndarray | None = None
    time: np.ndarray | None = None
    event: np.ndarray | None = None
    logrank: dict[str, float] | None = None
    encoder: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "loss": self.loss, "classes": self.classes, "n_slides": len(self.slides),
                "n_patients": len(set(self.patients)), "folds": int(self.fold.max()) + 1, "encoder": self.encoder,
                "metrics": {m: ci.to_dict() for m, ci in self.metrics.items()}, "fold_metrics": self.fold_metrics,
                "logrank": self.logrank}

    def prediction_rows(self) -> list[dict[str, Any]]:
        rows = []
        for i, s in enumerate(self.slides):
            r = {"slide": s, "patient": self.patients[i], "fold": int(self.fold[i])}
            if self.task == "classification":
                r["label"] = self.classes[int(self.y[i])]
                r.update({f"p_{c}": float(self.predictions[i, k]) for k, c in enumerate(self.classes)})
            else:
                r.update(time=float(self.time[i]), event=int(self.event[i]), risk=float(self.predictions[i]))
            rows.append(r)
        return rows


def resolve_task(bags: list[Bag], task: str) -> str:
    if task != "auto":
        return task
    return "classification" if all(b.label is not None for b in bags) else "survival"


def check_bags(bags: list[Bag], task: str, folds: int, source: str = "the cohort") -> None:
    """One sentence for each way a cohort can be unusable for ``task``."""
    if not bags:
        raise EvaluationError(f"{source}: no slides.")
    for b in bags:
        if len(b.features) == 0:
            raise EvaluationError(f"{source}: slide '{b.slide_id}' has no patches.")
        if not np.isfinite(b.features).all():
            raise EvaluationError(f"{source}: the features of slide '{b.slide_id}' contain NaN or infinite values; "
                                  "check the encoder and its weights.")
    dims = {b.features.shape[1] for b in bags}
    if len(dims) > 1:
        raise EvaluationError(f"{source}: slides have features of different sizes {sorted(dims)}; use one encoder.")
    if task == "classification":
        missing = [b.slide_id for b in bags if b.label is None or str(b.label) == ""]
        if missing:
            raise EvaluationError(f"{source}: slide '{missing[0]}' has no label.")
        classes = sorted({str(b.label) for b in bags})
        if len(classes) < 2:
            raise EvaluationError(f"{source}: every slide has the label '{classes[0]}'; classification needs two classes or more.")
    else:
        for b in bags:
            if b.time is None or b.event is None or not np.isfinite(b.time):
                raise EvaluationError(f"{source}: slide '{b.slide_id}' has no survival time or event.")
            if b.time < 0:
                raise EvaluationError(f"{source}: slide '{b.slide_id}' has a negative time ({b.time:g}).")
            if b.event not in (0, 1):
                raise EvaluationError(f"{source}: slide '{b.slide_id}' has event {b.event}; events must be 0 (censored) or 1.")
        if not any(b.event for b in bags):
            raise EvaluationError(f"{source}: every slide is censored (no event); survival needs events.")
    fixed = [b.fold for b in bags]
    if any(f is not None for f in fixed):
        if any(f is None for f in fixed):
            raise EvaluationError(f"{source}: the fold column is empty for some slides; give every slide a fold or none.")
        check_grouping(np.array([b.patient for b in bags], object), np.array(fixed))
        if len(set(fixed)) < 2:
            raise EvaluationError(f"{source}: the fold column names one fold only; cross-validation needs two or more.")


def assign_folds(bags: list[Bag], task: str, folds: int, seed: int) -> np.ndarray:
    """Fold per bag: the cohort's own folds, or a patient-grouped stratified split."""
    if bags[0].fold is not None:
        uniq = sorted({b.fold for b in bags})
        return np.array([uniq.index(b.fold) for b in bags])
    patients = np.array([b.patient for b in bags], object)
    strat = np.array([str(b.label) for b in bags] if task == "classification" else [int(b.event) for b in bags])
    return grouped_folds(np.unique(strat, return_inverse=True)[1], patients, folds, seed, what="cohort")


def cross_validate(bags: list[Bag], config: MILConfig | None = None, cancel: CancelToken | None = None,
                   source: str = "the cohort") -> Iterator[Progress]:
    """Cross-validate ABMIL; a generator of progress events returning a :class:`MILResult`."""
    from .train_mil import predict, train_fold

    cfg = config or MILConfig()
    task = resolve_task(bags, cfg.task)
    check_bags(bags, task, cfg.folds, source)
    fold = assign_folds(bags, task, cfg.folds, cfg.seed)
    k = int(fold.max()) + 1
    classes = sorted({str(b.label) for b in bags}) if task == "classification" else []
    y = np.array([classes.index(str(b.label)) for b in bags]) if task == "classification" else None
    t = np.array([float(b.time) for b in bags]) if task == "survival" else None
    e = np.array([int(b.event) for b in bags]) if task == "survival" else None
    preds = np.zeros((len(bags), len(classes))) if task == "classification" else np.zeros(len(bags))
    attention: list[np.ndarray] = [np.zeros(0)] * len(bags)
    fold_metrics = []
    for f in range(k):
        if cancel is not None:
            cancel.raise_if_cancelled()
        yield Progress(f, k, f"fold {f + 1}/{k}: training ABMIL ({task})")
        tr, te = np.flatnonzero(fold != f), np.flatnonzero(fold == f)
        if task == "classification" and len(np.unique(y[tr])) < 2:
            raise EvaluationError(f"{source}: the training part of fold {f + 1} has one class only; use fewer folds.")
        if task == "survival" and e[tr].sum() == 0:
            raise EvaluationError(f"{source}: the training part of fold {f + 1} has no event; use fewer folds.")
        model, aux = train_fold([bags[i] for i in tr], task, cfg, y=None if y is None else y[tr],
                                time=None if t is None else t[tr], event=None if e is None else e[tr],
                                n_classes=len(classes), seed=cfg.seed + f, cancel=cancel)
        out, att = predict(model, aux, [bags[i] for i in te], task, cfg)
        if task == "survival" and cfg.loss == "cox":
            out = (out - out.mean()) / (out.std() + 1e-8)  # Cox risks have no common scale across folds
        preds[te] = out
        for j, i in enumerate(te):
            attention[i] = att[j]
        fm = {"fold": f, "n_test": int(len(te))}
        if task == "survival":
            fm["c_index"] = c_index(t[te], e[te], out)
        fold_metrics.append(fm)
    patients = [b.patient for b in bags]
    if task == "classification":
        metrics = classification_cis(y, preds, patients, cfg.n_boot, cfg.seed)
        lr = None
    else:
        metrics = survival_cis(t, e, preds, patients, cfg.n_boot, cfg.seed)
        stat, p = logrank(t, e, risk_groups(preds, 2))
        lr = {"statistic": stat, "p_value": p}
    yield Progress(k, k, "cross-validation done")
    return MILResult(task, cfg.loss if task == "survival" else None, classes, [b.slide_id for b in bags], patients,
                     fold, preds, attention, metrics, fold_metrics, y, t, e, lr)
