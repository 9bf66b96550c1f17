"""PNG plots of evaluations (matplotlib, Agg backend): ROC curves, Kaplan-Meier curves,
metric bars with confidence intervals, and data size against performance."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(p, dpi=110)
    _plt().close(fig)
    return p


def roc_png(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: str | Path, title: str = "ROC") -> Path:
    """``curves``: name -> (y (0/1), score). One ROC curve per name, AUC in the legend."""
    from sklearn.metrics import roc_curve

    from .metrics import auc

    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.5, 4.2))
    for name, (y, s) in curves.items():
        fpr, tpr, _ = roc_curve(y, s)
        ax.plot(fpr, tpr, label=f"{name} (AUC {auc(y, s):.3f})")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title)
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, path)


def km_png(time: np.ndarray, event: np.ndarray, groups: np.ndarray, path: str | Path, title: str = "Kaplan-Meier",
           names: Sequence[str] = ("low risk", "high risk"), p_value: float | None = None) -> Path:
    """Kaplan-Meier curves (with 95% bands) of predicted risk groups, log-rank p in the title."""
    from .stats import kaplan_meier

    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.8, 4.0))
    for g in np.unique(groups):
        m = groups == g
        km = kaplan_meier(time[m], event[m], label=names[int(g)] if int(g) < len(names) else f"group {g}")
        ax.step(km.time, km.survival, where="post", label=f"{km.label} (n={km.n}, events={km.events})")
        ax.fill_between(km.time, km.low, km.high, step="post", alpha=0.15)
    if p_value is not None and np.isfinite(p_value):
        title = f"{title}\nlog-rank p = {p_value:.3g}"
    ax.set(xlabel="time", ylabel="survival probability", title=title, ylim=(0, 1.02))
    ax.legend(fontsize=7)
    return _save(fig, path)


def metric_bars_png(rows: list[dict], path: str | Path, metric: str, title: str | None = None) -> Path:
    """Bars of one metric per encoder (``rows``: dicts with encoder, value, low, high)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(rows) + 1.5), 3.6))
    names = [r["encoder"] for r in rows]
    v = np.array([np.nan if r["value"] is None else r["value"] for r in rows], float)
    lo = np.array([np.nan if r.get("low") is None else r["low"] for r in rows], float)
    hi = np.array([np.nan if r.get("high") is None else r["high"] for r in rows], float)
    err = np.vstack([np.nan_to_num(v - lo), np.nan_to_num(hi - v)])
    ax.bar(range(len(rows)), v, yerr=err, capsize=4, color="#4c78a8")
    ax.set_xticks(range(len(rows)), names, rotation=30, ha="right", fontsize=8)
    ax.set(ylabel=metric, title=title or metric)
    if metric in ("auc", "c_index", "balanced_accuracy"):
        ax.axhline(0.5, ls="--", c="grey", lw=0.8)
    return _save(fig, path)


def data_size_png(series: dict[str, list[tuple[float, float, float, float]]], path: str | Path, metric: str,
                  xlabel: str = "training patches") -> Path:
    """``series``: name -> [(size, value, low, high)]; metric against data size (log x)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.8, 3.8))
    for name, pts in series.items():
        pts = sorted(pts)
        x = np.array([p[0] for p in pts], float)
        y = np.array([p[1] for p in pts], float)
        ax.plot(x, y, marker="o", label=name)
        ax.fill_between(x, [p[2] for p in pts], [p[3] for p in pts], alpha=0.15)
    if len({p[0] for pts in series.values() for p in pts}) > 1:
        ax.set_xscale("log")
    ax.set(xlabel=xlabel, ylabel=metric, title=f"{metric} against data size")
    ax.legend(fontsize=7)
    return _save(fig, path)
