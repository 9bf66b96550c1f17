"""Metrics of the evaluation stage and their bootstrap confidence intervals.

Classification: one-vs-rest AUC (macro over classes; plain ROC AUC for two classes),
balanced accuracy and macro-F1, in numpy (fast in bootstrap loops; the tests check them
against scikit-learn). Survival: Harrell's C-index from
lifelines. A confidence interval is the percentile interval of the metric over
bootstrap resamples of *units* (patients when given, otherwise single samples), so
correlated samples of one patient move together. A resample on which a metric is not
defined (one class only, no comparable pair) is skipped and counted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

CLASSIFICATION_METRICS = ("auc", "balanced_accuracy", "f1_macro")
SURVIVAL_METRICS = ("c_index",)


@dataclass(frozen=True)
class CI:
    """A metric's value on all data with a bootstrap (1 - alpha) percentile interval."""

    value: float
    low: float
    high: float
    n_boot: int = 0
    """Resamples on which the metric was defined."""

    def to_dict(self) -> dict[str, float]:
        return {"value": _r(self.value), "low": _r(self.low), "high": _r(self.high), "n_boot": self.n_boot}

    @classmethod
    def from_dict(cls, d: dict) -> "CI":
        f = lambda v: float("nan") if v is None else float(v)  # noqa: E731
        return cls(f(d["value"]), f(d["low"]), f(d["high"]), int(d.get("n_boot", 0)))

    def __str__(self) -> str:
        return f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}]"


def _r(v: float):
    return None if v is None or not math.isfinite(v) else round(float(v), 6)


# -- point metrics ---------------------------------------------------------------------------
def as_proba(scores: np.ndarray) -> np.ndarray:
    """(N,) positive-class scores or (N, C) class probabilities -> (N, C) array."""
    s = np.asarray(scores, dtype=float)
    return np.stack([1 - s, s], axis=1) if s.ndim == 1 else s


def _binary_auc(pos: np.ndarray, score: np.ndarray) -> float:
    """Mann-Whitney ROC AUC with ties counted half (equals scikit-learn's ``roc_auc_score``)."""
    from scipy.stats import rankdata

    n1 = int(pos.sum())
    n0 = len(pos) - n1
    if n1 == 0 or n0 == 0:
        return float("nan")
    ranks = rankdata(score)
    return float((ranks[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def auc(y: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC (two classes) or macro one-vs-rest AUC over the classes present; NaN with one class.

    Computed from ranks (fast enough for thousands of bootstrap resamples); equal to
    scikit-learn's ``roc_auc_score(..., multi_class="ovr", average="macro")``.
    """
    y = np.asarray(y)
    p = as_proba(scores)
    present = np.unique(y)
    if len(present) < 2:
        return float("nan")
    if p.shape[1] == 2:
        return _binary_auc(y == 1, p[:, 1])
    return float(np.mean([_binary_auc(y == c, p[:, c]) for c in present]))


def _confusion(y: np.ndarray, scores: np.ndarray):
    y = np.asarray(y).astype(int)
    pred = as_proba(scores).argmax(1)
    k = max(int(y.max(initial=0)), int(pred.max(initial=0))) + 1
    return np.bincount(y * k + pred, minlength=k * k).reshape(k, k), np.unique(y)


def balanced_accuracy(y: np.ndarray, scores: np.ndarray) -> float:
    """Mean recall over the classes present in ``y`` (scikit-learn's ``balanced_accuracy_score``)."""
    if len(y) == 0:
        return float("nan")
    cm, present = _confusion(y, scores)
    return float(np.mean([cm[c, c] / cm[c].sum() for c in present]))


def f1_macro(y: np.ndarray, scores: np.ndarray) -> float:
    """Macro-F1 over the classes present in ``y`` (a class never predicted scores 0)."""
    if len(y) == 0:
        return float("nan")
    cm, present = _confusion(y, scores)
    f1 = []
    for c in present:
        tp, fp, fn = cm[c, c], cm[:, c].sum() - cm[c, c], cm[c].sum() - cm[c, c]
        f1.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return float(np.mean(f1))


def c_index(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> float:
    """Harrell's C-index (lifelines) of a risk score (higher = earlier event); NaN without comparable pairs."""
    from lifelines.utils import concordance_index

    time, event, risk = (np.asarray(a, dtype=float) for a in (time, event, risk))
    if len(time) < 2 or event.sum() == 0:
        return float("nan")
    try:
        return float(concordance_index(time, -risk, event))
    except ZeroDivisionError:  # no admissible pairs
        return float("nan")


CLASSIFIERS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "auc": auc, "balanced_accuracy": balanced_accuracy, "f1_macro": f1_macro,
}


# -- bootstrap -------------------------------------------------------------------------------
def unit_index(n: int, groups: Sequence | None) -> list[np.ndarray]:
    """Sample indices of each resampling unit (a group, or each sample alone)."""
    if groups is None:
        return [np.array([i]) for i in range(n)]
    g = np.asarray(groups)
    _, inv = np.unique(g, return_inverse=True)
    order = np.argsort(inv, kind="stable")
    bounds = np.flatnonzero(np.diff(inv[order])) + 1
    return np.split(order, bounds)


def resample_indices(units: list[np.ndarray], n_boot: int, seed: int):
    """Yield ``n_boot`` index arrays, each a resample of units with replacement."""
    rng = np.random.default_rng(seed)
    k = len(units)
    for _ in range(n_boot):
        pick = rng.integers(0, k, size=k)
        yield np.concatenate([units[j] for j in pick])


def bootstrap(stat: Callable[[np.ndarray], float], n: int, groups: Sequence | None = None, n_boot: int = 1000,
              seed: int = 0, alpha: float = 0.05) -> CI:
    """Percentile bootstrap CI of ``stat(indices)`` over resamples of units.

    ``stat`` gets an index array into the ``n`` samples and returns the metric (NaN where
    undefined). Resamples where it is NaN are skipped; the interval is NaN if more than
    half are.
    """
    value = float(stat(np.arange(n)))
    units = unit_index(n, groups)
    vals = np.array([stat(idx) for idx in resample_indices(units, n_boot, seed)], dtype=float) if n_boot else np.array([])
    ok = vals[np.isfinite(vals)]
    if len(ok) < max(1, n_boot // 2):
        return CI(value, float("nan"), float("nan"), len(ok))
    lo, hi = np.quantile(ok, [alpha / 2, 1 - alpha / 2])
    return CI(value, float(lo), float(hi), len(ok))


def classification_cis(y: np.ndarray, scores: np.ndarray, groups: Sequence | None = None, n_boot: int = 1000,
                       seed: int = 0, metrics: Sequence[str] = CLASSIFICATION_METRICS) -> dict[str, CI]:
    """AUC, balanced accuracy and macro-F1 of predictions, each with a bootstrap CI."""
    y = np.asarray(y)
    p = as_proba(scores)
    return {m: bootstrap(lambda i, f=CLASSIFIERS[m]: f(y[i], p[i]), len(y), groups, n_boot, seed) for m in metrics}


def survival_cis(time: np.ndarray, event: np.ndarray, risk: np.ndarray, groups: Sequence | None = None,
                 n_boot: int = 1000, seed: int = 0) -> dict[str, CI]:
    """C-index of a risk score with a bootstrap CI."""
    t, e, r = (np.asarray(a, dtype=float) for a in (time, event, risk))
    return {"c_index": bootstrap(lambda i: c_index(t[i], e[i], r[i]), len(t), groups, n_boot, seed)}
