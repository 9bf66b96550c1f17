"""Paired comparisons of two encoders, Kaplan-Meier curves and the log-rank test.

Two encoders evaluated on the *same* folds and patients give paired predictions; the
difference of a metric (A - B) is judged by

- a paired bootstrap: units (patients) are resampled with replacement and the metric
  difference recomputed; the percentile interval is the CI and the two-sided p-value
  is twice the smaller tail share around zero;
- a paired permutation test: within each unit the two encoders' predictions are swapped
  at random (all 2^k swaps when that is at most ``n_perm``, the exact test); the
  p-value is the share of swaps whose |difference| reaches the observed one.

The verdict is "wins" when the CI lies above zero, "loses" below, "ties" otherwise.
Kaplan-Meier estimates and the log-rank test come from lifelines.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from .metrics import resample_indices, unit_index


@dataclass(frozen=True)
class Comparison:
    """The paired difference of a metric between encoder A and encoder B."""

    metric: str
    a: float
    b: float
    diff: float
    low: float
    high: float
    p_bootstrap: float
    p_permutation: float | None = None

    @property
    def verdict(self) -> str:
        if np.isfinite(self.low) and self.low > 0:
            return "wins"
        if np.isfinite(self.high) and self.high < 0:
            return "loses"
        return "ties"

    @property
    def p_value(self) -> float:
        return self.p_permutation if self.p_permutation is not None else self.p_bootstrap

    def to_dict(self) -> dict:
        r = lambda v: None if v is None or not np.isfinite(v) else round(float(v), 6)  # noqa: E731
        return {"metric": self.metric, "a": r(self.a), "b": r(self.b), "diff": r(self.diff), "low": r(self.low),
                "high": r(self.high), "p_bootstrap": r(self.p_bootstrap), "p_permutation": r(self.p_permutation),
                "p_value": r(self.p_value), "verdict": self.verdict}


Metric = Callable[[np.ndarray, np.ndarray], float]
"""``metric(prediction_rows, indices)`` -> value, NaN where undefined."""


def paired_bootstrap(metric: Callable[[np.ndarray, np.ndarray], float], pred_a: np.ndarray, pred_b: np.ndarray,
                     groups: Sequence | None = None, n_boot: int = 2000, seed: int = 0, alpha: float = 0.05):
    """(diff, low, high, p) of ``metric(pred_a, idx) - metric(pred_b, idx)`` over unit resamples."""
    n = len(pred_a)
    full = np.arange(n)
    diff = float(metric(pred_a, full) - metric(pred_b, full))
    d = []
    for idx in resample_indices(unit_index(n, groups), n_boot, seed):
        v = metric(pred_a, idx) - metric(pred_b, idx)
        if np.isfinite(v):
            d.append(v)
    d = np.asarray(d)
    if len(d) < max(1, n_boot // 2):
        return diff, float("nan"), float("nan"), float("nan")
    lo, hi = np.quantile(d, [alpha / 2, 1 - alpha / 2])
    p = min(1.0, 2 * min((d <= 0).mean(), (d >= 0).mean()))
    # at least 1/len(d): a finite resample count cannot show p = 0
    return diff, float(lo), float(hi), float(max(p, 1.0 / len(d)))


def paired_permutation(metric: Callable[[np.ndarray, np.ndarray], float], pred_a: np.ndarray, pred_b: np.ndarray,
                       groups: Sequence | None = None, n_perm: int = 2000, seed: int = 0) -> float:
    """Two-sided p-value of the paired permutation test of ``metric(A) - metric(B)``.

    Each unit's predictions are swapped between A and B with probability 1/2; with k
    units and 2^k <= ``n_perm`` all swaps are enumerated (exact test, as
    ``scipy.stats.permutation_test(permutation_type="samples")``), otherwise
    ``n_perm`` random swaps plus the observed one are used.
    """
    pa, pb = np.asarray(pred_a), np.asarray(pred_b)
    n = len(pa)
    full = np.arange(n)
    units = unit_index(n, groups)
    obs = metric(pa, full) - metric(pb, full)
    if not np.isfinite(obs):
        return float("nan")
    k = len(units)

    def diff_for(flips) -> float:
        sa, sb = pa.copy(), pb.copy()
        for u, f in zip(units, flips):
            if f:
                sa[u], sb[u] = pb[u], pa[u]
        return metric(sa, full) - metric(sb, full)

    if 2 ** k <= n_perm:
        diffs = np.array([diff_for(f) for f in itertools.product((0, 1), repeat=k)])
        tol = 1e-12 * max(1.0, abs(obs))
        return float(np.mean(np.abs(diffs) >= abs(obs) - tol))
    rng = np.random.default_rng(seed)
    diffs = np.array([diff_for(rng.integers(0, 2, size=k)) for _ in range(n_perm)])
    tol = 1e-12 * max(1.0, abs(obs))
    return float((np.sum(np.abs(diffs) >= abs(obs) - tol) + 1) / (n_perm + 1))


def compare(name: str, metric: Callable[[np.ndarray, np.ndarray], float], pred_a: np.ndarray, pred_b: np.ndarray,
            groups: Sequence | None = None, n_boot: int = 2000, n_perm: int = 0, seed: int = 0) -> Comparison:
    """Paired comparison of two encoders' predictions on the same units (see the module docstring)."""
    full = np.arange(len(pred_a))
    diff, lo, hi, p = paired_bootstrap(metric, pred_a, pred_b, groups, n_boot, seed)
    pp = paired_permutation(metric, pred_a, pred_b, groups, n_perm, seed) if n_perm else None
    return Comparison(name, float(metric(pred_a, full)), float(metric(pred_b, full)), diff, lo, hi, p, pp)


# -- survival curves -----------------------------------------------------------------------
@dataclass
class KMCurve:
    label: str
    time: np.ndarray
    survival: np.ndarray
    low: np.ndarray
    high: np.ndarray
    n: int
    events: int


def kaplan_meier(time: np.ndarray, event: np.ndarray, label: str = "all") -> KMCurve:
    """Kaplan-Meier estimate with its 95% (exponential Greenwood) band, from lifelines."""
    from lifelines import KaplanMeierFitter

    km = KaplanMeierFitter().fit(np.asarray(time, float), np.asarray(event, bool), label=label)
    sf = km.survival_function_
    ci = km.confidence_interval_survival_function_
    return KMCurve(label, sf.index.to_numpy(float), sf.iloc[:, 0].to_numpy(float), ci.iloc[:, 0].to_numpy(float),
                   ci.iloc[:, 1].to_numpy(float), int(len(time)), int(np.sum(event)))


def risk_groups(risk: np.ndarray, n_groups: int = 2) -> np.ndarray:
    """Group index per sample by quantiles of the predicted risk (0 = lowest risk)."""
    r = np.asarray(risk, float)
    if n_groups < 2:
        return np.zeros(len(r), int)
    edges = np.quantile(r, np.linspace(0, 1, n_groups + 1)[1:-1])
    return np.searchsorted(edges, r, side="right")


def logrank(time: np.ndarray, event: np.ndarray, groups: np.ndarray) -> tuple[float, float]:
    """(chi-square statistic, p-value) of the log-rank test across ``groups`` (lifelines)."""
    from lifelines.statistics import multivariate_logrank_test

    g = np.asarray(groups)
    if len(np.unique(g)) < 2:
        return float("nan"), float("nan")
    res = multivariate_logrank_test(np.asarray(time, float), g, np.asarray(event, bool))
    return float(res.test_statistic), float(res.p_value)
