"""Patch-level probes of frozen features: a linear probe (logistic regression) and k-NN.

Both are trained and tested with k-fold cross-validation whose folds are *grouped*:
all patches of a group (slide, patient) are on the same side of every split
(scikit-learn's ``StratifiedGroupKFold``), and this is checked. Out-of-fold predictions
of all patches give balanced accuracy, macro-F1 and one-vs-rest AUC, each with a
bootstrap 95% CI over groups.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ..progress import CancelToken, Progress
from .errors import EvaluationError
from .metrics import CI, classification_cis

PROBES = ("linear", "knn")


class ProbeConfig(BaseModel):
    """Parameters of ``protodiff evaluate probe`` (API, CLI and widget)."""

    model_config = ConfigDict(extra="forbid")

    encoder: str | None = Field(None, description="Encoder name or path (the built-in encoder when empty).")
    weights: str | None = Field(None, description="Weights file of a named encoder.")
    arch: str | None = Field(None, description="timm architecture of a weights file.")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N or mps.")
    folds: int = Field(5, ge=2, le=50, description="Cross-validation folds (grouped).")
    k: int = Field(20, ge=1, le=1000, description="Neighbours of the k-NN probe.")
    c: float = Field(1.0, gt=0, description="Inverse L2 strength of the logistic regression.")
    n_boot: int = Field(1000, ge=0, le=100000, description="Bootstrap resamples of the confidence intervals.")
    batch_size: int = Field(64, ge=1, le=65536)
    seed: int = 0


@dataclass
class ProbeResult:
    source: str
    encoder: dict[str, Any]
    n_patches: int
    n_groups: int
    classes: list[str]
    folds: int
    metrics: dict[str, dict[str, CI]]
    """probe -> metric -> CI."""
    predictions: dict[str, np.ndarray] = field(repr=False, default_factory=dict)
    """probe -> (N, C) out-of-fold class probabilities."""
    y: np.ndarray | None = field(repr=False, default=None)
    groups: np.ndarray | None = field(repr=False, default=None)
    fold: np.ndarray | None = field(repr=False, default=None)

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "encoder": self.encoder, "n_patches": self.n_patches, "n_groups": self.n_groups,
                "classes": self.classes, "folds": self.folds,
                "metrics": {p: {m: ci.to_dict() for m, ci in ms.items()} for p, ms in self.metrics.items()}}


def grouped_folds(y: np.ndarray, groups: np.ndarray, folds: int, seed: int, what: str = "patch set") -> np.ndarray:
    """Fold index per sample; every group in exactly one fold, classes stratified where possible."""
    from sklearn.model_selection import StratifiedGroupKFold

    n_groups = len(np.unique(groups))
    if n_groups < folds:
        raise EvaluationError(f"The {what} has {n_groups} group(s), fewer than the {folds} folds asked for; "
                              "use fewer folds or more groups.")
    fold = np.full(len(y), -1)
    cv = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    for f, (_, test) in enumerate(cv.split(np.zeros(len(y)), y, groups)):
        fold[test] = f
    check_grouping(groups, fold)
    return fold


def check_grouping(groups: np.ndarray, fold: np.ndarray) -> None:
    """Refuse a split where one group appears in two folds."""
    seen: dict[Any, int] = {}
    for g, f in zip(groups, fold):
        if seen.setdefault(g, f) != f:
            raise EvaluationError(f"Group '{g}' is in folds {seen[g]} and {f}; a group must be on one side of every split.")


def _fit_predict(kind: str, x_tr, y_tr, x_te, n_classes: int, cfg: ProbeConfig) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.preprocessing import StandardScaler

    out = np.zeros((len(x_te), n_classes))
    present = np.unique(y_tr)
    if len(present) == 1:
        out[:, present[0]] = 1.0
        return out
    if kind == "linear":
        sc = StandardScaler().fit(x_tr)
        m = LogisticRegression(C=cfg.c, max_iter=2000).fit(sc.transform(x_tr), y_tr)
        out[:, m.classes_] = m.predict_proba(sc.transform(x_te))
    else:
        norm = lambda a: a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)  # noqa: E731
        m = KNeighborsClassifier(n_neighbors=min(cfg.k, len(x_tr)), metric="cosine", weights="distance")
        m.fit(norm(x_tr), y_tr)
        out[:, m.classes_] = m.predict_proba(norm(x_te))
    return out


def probe_features(x: np.ndarray, labels: np.ndarray, groups: np.ndarray, cfg: ProbeConfig,
                   probes=PROBES, source: str = "patch set", encoder: dict | None = None,
                   cancel: CancelToken | None = None) -> ProbeResult:
    """Cross-validated probes of given features (the part of :func:`run_probe` after encoding)."""
    classes = sorted(set(np.asarray(labels).tolist()))
    if len(classes) < 2:
        raise EvaluationError(f"{source}: one class only ('{classes[0]}'); a probe needs two classes or more.")
    if not np.isfinite(x).all():
        raise EvaluationError(f"{source}: the features contain NaN or infinite values.")
    y = np.searchsorted(classes, labels)
    fold = grouped_folds(y, np.asarray(groups), cfg.folds, cfg.seed, what=source)
    preds = {p: np.zeros((len(y), len(classes))) for p in probes}
    for f in range(cfg.folds):
        if cancel is not None:
            cancel.raise_if_cancelled()
        tr, te = fold != f, fold == f
        for p in probes:
            preds[p][te] = _fit_predict(p, x[tr], y[tr], x[te], len(classes), cfg)
    metrics = {p: classification_cis(y, preds[p], groups, cfg.n_boot, cfg.seed) for p in probes}
    return ProbeResult(source, encoder or {}, len(y), len(np.unique(groups)), classes, cfg.folds, metrics, preds, y,
                       np.asarray(groups), fold)


def run_probe(source: str | Path, config: ProbeConfig | None = None,
              cancel: CancelToken | None = None, encoder=None) -> Iterator[Progress]:
    """Probe an encoder on a labelled patch set; a generator of progress returning a :class:`ProbeResult`."""
    from ..encoders import load_encoder
    from .patchsets import load_patch_set, patch_set_features

    cfg = config or ProbeConfig()
    ps = load_patch_set(source)
    grouped_folds(np.searchsorted(ps.classes, ps.labels), ps.groups, cfg.folds, cfg.seed, what=str(source))
    yield Progress(0, 0, "loading the encoder")
    enc = encoder or load_encoder(cfg.encoder, weights=cfg.weights, arch=cfg.arch, device=cfg.device)
    x = yield from patch_set_features(ps, enc, cfg.batch_size, cancel)
    yield Progress(0, cfg.folds, "fitting probes")
    return probe_features(x, ps.labels, ps.groups, cfg, source=str(source), encoder=enc.identity(), cancel=cancel)
