"""The comparison report: Markdown with PNG plots, written into a run directory's outputs.

``report.md`` holds the results table (encoder x task x metric, mean and 95% CI, best
in bold, paired significance against the reference) and the plots: metric bars with
CIs per task, ROC curves (binary classification tasks), Kaplan-Meier curves of
predicted risk halves (survival tasks), and data size against performance when the
encoders' training-set sizes are known. ``table.json`` and ``table.csv`` hold the rows.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np

from .compare import table_markdown
from .plots import data_size_png, km_png, metric_bars_png, roc_png
from .stats import risk_groups

MAIN_METRIC = {"classification": "auc", "survival": "c_index", "probe": "balanced_accuracy"}


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in s)


def _kind(task_result) -> str:
    return getattr(task_result, "task", None) or "probe"


def write_report(folder: str | Path, rows: list[dict[str, Any]], results: dict[str, dict[str, Any]],
                 title: str = "Encoder comparison", reference: str | None = None,
                 sizes: dict[str, float] | None = None, notes: list[str] | None = None) -> Path:
    """Write report.md, table.json, table.csv and plots/ into ``folder``; returns the report's path."""
    out = Path(folder)
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    md = [f"# {title}\n"]
    if notes:
        md += [f"- {n}" for n in notes] + [""]
    md += ["## Results\n", table_markdown(rows, reference),
           "Mean with 95% bootstrap CI (resampling patients, or groups for patch probes); **bold**: best of the column; "
           "▲/▼: significantly better/worse than the reference (95% CI of the paired difference excludes 0), "
           "p: paired bootstrap (or permutation) p-value.\n"]
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    for task in tasks:
        md.append(f"## {task}\n")
        metric = None
        for r in rows:
            if r["task"] == task:
                metric = metric or r["metric"]
        any_res = next(res[task] for res in results.values() if task in res)
        kind = _kind(any_res)
        main = MAIN_METRIC.get(kind, metric)
        bar_rows = [r for r in rows if r["task"] == task and r["metric"] == main]
        if bar_rows:
            p = metric_bars_png(bar_rows, plots / f"{_slug(task)}_{main}.png", main, title=f"{task}: {main}")
            md.append(f"![{task} {main}](plots/{p.name})\n")
        if kind == "classification" and len(any_res.classes) == 2:
            curves = {enc: (res[task].y, res[task].predictions[:, 1]) for enc, res in results.items() if task in res}
            p = roc_png(curves, plots / f"{_slug(task)}_roc.png", title=f"ROC: {task}")
            md.append(f"![{task} ROC](plots/{p.name})\n")
        if kind == "survival":
            for enc, res in results.items():
                if task not in res:
                    continue
                r = res[task]
                pv = (r.logrank or {}).get("p_value")
                p = km_png(r.time, r.event, risk_groups(r.predictions, 2), plots / f"{_slug(task)}_km_{_slug(enc)}.png",
                           title=f"{task}: {enc}", p_value=pv)
                md.append(f"![{task} KM {enc}](plots/{p.name})\n")
    if sizes:
        series: dict[str, list] = {}
        for task in tasks:
            for r in rows:
                if r["task"] == task and r["encoder"] in sizes and r["metric"] == MAIN_METRIC.get(
                        _kind(next(res[task] for res in results.values() if task in res)), r["metric"]):
                    series.setdefault(task, []).append((sizes[r["encoder"]], r["value"], r["low"], r["high"]))
        if series:
            p = data_size_png(series, plots / "data_size.png", "main metric")
            md += ["## Data size against performance\n", f"![data size](plots/{p.name})\n"]
    (out / "table.json").write_text(json.dumps(rows, indent=2, default=_json_default))
    with open(out / "table.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["encoder", "task", "metric", "value", "low", "high", "best", "diff_vs_ref", "p_vs_ref", "verdict"])
        for r in rows:
            v = r.get("vs_reference") or {}
            w.writerow([r["encoder"], r["task"], r["metric"], r["value"], r["low"], r["high"], r["best"],
                        v.get("diff"), v.get("p_value"), v.get("verdict")])
    path = out / "report.md"
    tmp = path.with_name("report.md.partial")
    tmp.write_text("\n".join(md), encoding="utf-8")
    tmp.replace(path)
    return path


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.bool_):
        return bool(o)
    return str(o)
