"""Comparing encoders: the paper-shaped results table, with paired significance tests.

``results[encoder][task]`` holds each encoder's evaluation of each task (a
:class:`~.mil.MILResult` or :class:`~.probe.ProbeResult`), all made on the same slides
(or patches) and folds. Every metric of every task becomes a row: encoder, task,
metric, value with its 95% CI, whether it is the best of the task, and the paired
comparison against the reference encoder (difference with CI, p-value, verdict).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import EvaluationError
from .metrics import CLASSIFIERS, c_index
from .stats import Comparison, compare


def _paired_units(res) -> tuple[list, np.ndarray | None]:
    """(unit ids, groups for resampling) of a result: slides and patients, or patches and groups."""
    if hasattr(res, "slides"):
        return list(res.slides), np.asarray(res.patients, object)
    return list(range(res.n_patches)), None if res.groups is None else np.asarray(res.groups, object)


def _metric_fn(res, metric: str, probe: str | None = None):
    """``(predictions, indices) -> value`` and the prediction array of a result."""
    if getattr(res, "task", None) == "survival":
        t, e = res.time, res.event
        return (lambda p, i: c_index(t[i], e[i], p[i])), np.asarray(res.predictions)
    f = CLASSIFIERS[metric]
    y = res.y
    pred = res.predictions[probe] if isinstance(res.predictions, dict) else res.predictions
    return (lambda p, i: f(y[i], p[i])), np.asarray(pred)


def _metrics_of(res, probe: str | None):
    return res.metrics[probe] if probe else res.metrics


def _check_paired(name_a: str, a, name_b: str, b, task: str) -> None:
    ua, _ = _paired_units(a)
    ub, _ = _paired_units(b)
    if ua != ub or not np.array_equal(np.asarray(a.fold), np.asarray(b.fold)):
        raise EvaluationError(f"Encoders '{name_a}' and '{name_b}' were not evaluated on the same slides and folds "
                              f"for task '{task}'; a paired comparison needs both.")


def results_table(results: dict[str, dict[str, Any]], reference: str | None = None, n_boot: int = 2000,
                  n_perm: int = 0, seed: int = 0) -> list[dict[str, Any]]:
    """Rows of the comparison table (see the module docstring); ``reference`` defaults to the first encoder."""
    encoders = list(results)
    if not encoders:
        raise EvaluationError("No evaluations to compare.")
    ref = reference or encoders[0]
    if ref not in results:
        raise EvaluationError(f"Reference encoder '{ref}' was not evaluated (encoders: {', '.join(encoders)}).")
    tasks = list(dict.fromkeys(t for r in results.values() for t in r))
    rows: list[dict[str, Any]] = []
    for task in tasks:
        have = [e for e in encoders if task in results[e]]
        first = results[have[0]][task]
        # a probe result is one task per probe (linear, knn): its only metrics key names it
        probe = next(iter(first.metrics)) if isinstance(first.predictions, dict) else None
        metrics = list(_metrics_of(results[have[0]][task], probe))
        for metric in metrics:
            block = []
            for enc in have:
                res = results[enc][task]
                ci = _metrics_of(res, probe)[metric]
                row = {"encoder": enc, "task": task, "metric": metric, "value": ci.value, "low": ci.low,
                       "high": ci.high, "best": False, "reference": enc == ref, "vs_reference": None}
                if enc != ref and task in results[ref]:
                    r0 = results[ref][task]
                    _check_paired(enc, res, ref, r0, task)
                    fn, pa = _metric_fn(res, metric, probe)
                    _, pb = _metric_fn(r0, metric, probe)
                    _, groups = _paired_units(res)
                    c: Comparison = compare(metric, fn, pa, pb, groups, n_boot=n_boot, n_perm=n_perm, seed=seed)
                    row["vs_reference"] = c.to_dict()
                block.append(row)
            vals = np.array([r["value"] if r["value"] is not None and np.isfinite(r["value"]) else -np.inf for r in block])
            if np.isfinite(vals).any():
                for r in block:
                    r["best"] = bool(r["value"] == vals.max())
            rows += block
    return rows


def table_markdown(rows: list[dict[str, Any]], reference: str | None = None) -> str:
    """The table as Markdown: encoders as rows, task/metric as columns; best in bold, significance vs the reference.

    Marks: ``▲`` significantly better than the reference, ``▼`` worse (95% CI of the paired
    difference excludes 0), with the p-value; no mark: a tie.
    """
    cols = list(dict.fromkeys((r["task"], r["metric"]) for r in rows))
    encoders = list(dict.fromkeys(r["encoder"] for r in rows))
    cell = {(r["encoder"], r["task"], r["metric"]): r for r in rows}
    head = "| encoder | " + " | ".join(f"{t} {m}" for t, m in cols) + " |"
    lines = [head, "|" + " --- |" * (len(cols) + 1)]
    for enc in encoders:
        out = []
        for t, m in cols:
            r = cell.get((enc, t, m))
            if r is None or r["value"] is None or not np.isfinite(r["value"]):
                out.append("n/a")
                continue
            s = f"{r['value']:.3f} [{r['low']:.3f}, {r['high']:.3f}]" if np.isfinite(r["low"]) else f"{r['value']:.3f}"
            if r["best"]:
                s = f"**{s}**"
            v = r.get("vs_reference")
            if v:
                mark = {"wins": " ▲", "loses": " ▼"}.get(v["verdict"], "")
                p = v.get("p_value")
                s += f"{mark} (p={p:.3g})" if p is not None else mark
            out.append(s)
        name = f"{enc} (reference)" if reference and enc == reference or any(
            cell.get((enc, t, m), {}).get("reference") for t, m in cols) else enc
        lines.append(f"| {name} | " + " | ".join(out) + " |")
    return "\n".join(lines) + "\n"
