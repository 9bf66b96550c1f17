"""Evaluations as jobs: a probe or an ABMIL cross-validation written into a run directory.

``outputs/`` of an ``evaluate-mil`` run::

    results.json       metrics with CIs, per-fold metrics, log-rank, encoder identity, cohort
    predictions.csv    out-of-fold prediction per slide (fold, label/probabilities or time/event/risk)
    attention.zarr     attention per patch with level-0 coordinates (see :mod:`.attention`)
    roc.png | km.png   ROC curves (classification) or Kaplan-Meier curves of risk halves (survival)

``outputs/`` of an ``evaluate-probe`` run: ``results.json`` and ``predictions.csv``.
The run's state becomes ``finished`` only once every output is written; a failed run
says ``failed`` with its one-sentence error (see :mod:`napari_protodiff.core.jobs`).

Outputs are written into ``outputs.partial/`` and put in place of ``outputs/`` only when
complete (a run that starts again empties ``outputs/`` first), so ``outputs/`` is either
empty or one attempt's complete set. Under :func:`~napari_protodiff.core.interrupts.cancel_on_signals` (the CLI's
evaluations and studies) SIGTERM ends a run like Ctrl-C: state ``cancelled``, exit 130.
"""

from __future__ import annotations

import contextlib
import csv
import shutil
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..interrupts import signals_held
from ..jobs import RunDir, atomic_write_json
from ..progress import CancelToken, Progress
from .mil import MILConfig, MILResult, cross_validate
from .probe import ProbeConfig, ProbeResult, run_probe


def _write_csv(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(path.name + ".partial")
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    tmp.replace(path)


def fresh_outputs(rd: RunDir) -> None:
    """Empty ``outputs/`` (and any stale ``outputs.partial/``) as a run (re)starts."""
    with signals_held():
        for p in (rd.outputs, rd.path / "outputs.partial"):
            shutil.rmtree(p, ignore_errors=True)
        rd.outputs.mkdir(exist_ok=True)


@contextlib.contextmanager
def running_fresh(rd: RunDir, fresh: bool = True) -> Iterator[RunDir]:
    """``rd.running()`` with an emptied ``outputs/`` (unless ``fresh`` is false: a resumable study keeps them);
    a signal arriving while this is set up waits until the run is marked running, so it always ends the run as
    ``cancelled``."""
    with contextlib.ExitStack() as stack:
        with signals_held():
            stack.enter_context(rd.running())
            if fresh:
                fresh_outputs(rd)
        yield rd


@contextlib.contextmanager
def staged_outputs(rd: RunDir, **finished: Any) -> Iterator[Path]:
    """A folder to write the outputs into; if the body completes it replaces ``outputs/`` and the run is marked
    ``finished`` (with ``finished`` as status fields), both before a signal can intervene."""
    stage = rd.path / "outputs.partial"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    with signals_held():
        shutil.rmtree(rd.outputs, ignore_errors=True)
        stage.rename(rd.outputs)
        rd.set_status("finished", **{"message": "finished", **finished})


def tracked(gen, rd: RunDir, every_s: float = 0.5):
    """Relay a job generator's progress events, mirroring them into the run's status.json (for watchers)."""
    import time

    last = 0.0
    try:
        while True:
            ev = next(gen)
            now = time.monotonic()
            if now - last >= every_s:
                rd.set_status("running", step=ev.step, total=ev.total, message=ev.message)
                last = now
            yield ev
    except StopIteration as stop:
        return stop.value


def mil_plots(result: MILResult, folder: Path, name: str = "") -> list[Path]:
    from .plots import km_png, roc_png
    from .stats import risk_groups

    out = []
    if result.task == "classification":
        if len(result.classes) == 2:
            curves = {name or "ABMIL": (result.y, result.predictions[:, 1])}
        else:
            curves = {f"{c} vs rest": ((result.y == k).astype(int), result.predictions[:, k])
                      for k, c in enumerate(result.classes)}
        out.append(roc_png(curves, folder / "roc.png", title=f"ROC {name}".strip()))
    else:
        g = risk_groups(result.predictions, 2)
        p = (result.logrank or {}).get("p_value")
        out.append(km_png(result.time, result.event, g, folder / "km.png", title=f"Kaplan-Meier {name}".strip(),
                          p_value=p))
    return out


def save_mil(result: MILResult, bags, folder: Path, extra: dict | None = None) -> None:
    from .attention import write_attention

    folder.mkdir(parents=True, exist_ok=True)
    _write_csv(folder / "predictions.csv", result.prediction_rows())
    write_attention(folder / "attention.zarr", bags, result)
    mil_plots(result, folder)
    atomic_write_json(folder / "results.json", {**result.to_dict(), **(extra or {})})


def evaluate_mil(cohort: str | Path, store: str | Path, run_dir: str | Path, config: MILConfig | None = None,
                 encoder: str | None = None, device: str = "auto", encoder_obj=None, resume: bool = False,
                 cancel: CancelToken | None = None) -> Iterator[Progress]:
    """``protodiff evaluate mil``: bags from the store, cross-validated ABMIL, outputs in ``run_dir``."""
    from .cohort import cohort_bags

    cfg = config or MILConfig()
    conf = {"cohort": str(Path(cohort).resolve()), "store": str(Path(store).resolve()), "encoder": encoder,
            "mil": cfg.model_dump()}
    rd = RunDir.prepare(run_dir, "evaluate-mil", conf, resume=resume)
    with running_fresh(rd):
        bags, ident = yield from tracked(cohort_bags(cohort, store, encoder=encoder_obj, encoder_name=encoder,
                                                     device=device, cancel=cancel), rd)
        rd.log(f"{len(bags)} slides, encoder {ident.get('name')}")
        result = yield from tracked(cross_validate(bags, cfg, cancel, source=str(cohort)), rd)
        result.encoder = ident
        with staged_outputs(rd, metrics={m: ci.to_dict() for m, ci in result.metrics.items()}) as out:
            save_mil(result, bags, out, {"cohort": conf["cohort"], "store": conf["store"]})
        rd.log("finished")
    return result, rd


def evaluate_probe(source: str | Path, run_dir: str | Path | None = None, config: ProbeConfig | None = None,
                   resume: bool = False, cancel: CancelToken | None = None, encoder=None) -> Iterator[Progress]:
    """``protodiff evaluate probe``: probes of a labelled patch set, outputs in ``run_dir`` when given."""
    cfg = config or ProbeConfig()
    if run_dir is None:
        result = yield from run_probe(source, cfg, cancel, encoder=encoder)
        return result, None
    rd = RunDir.prepare(run_dir, "evaluate-probe", {"patches": str(Path(source).resolve()), "probe": cfg.model_dump()},
                        resume=resume)
    with running_fresh(rd):
        result: ProbeResult = yield from tracked(run_probe(source, cfg, cancel, encoder=encoder), rd)
        rows = []
        for i in range(result.n_patches):
            r = {"index": i, "group": result.groups[i], "fold": int(result.fold[i]), "label": result.classes[result.y[i]]}
            for p, pr in result.predictions.items():
                r[f"{p}_pred"] = result.classes[int(np.argmax(pr[i]))]
            rows.append(r)
        with staged_outputs(rd) as out:
            _write_csv(out / "predictions.csv", rows)
            atomic_write_json(out / "results.json", result.to_dict())
    return result, rd
