"""``protodiff evaluate probe`` and ``protodiff evaluate mil``: judge an encoder."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from . import app
from ._common import print_json, run_with_progress

evaluate_app = typer.Typer(help="Evaluate an encoder: patch-level probes and slide-level ABMIL.", no_args_is_help=True)
app.add_typer(evaluate_app, name="evaluate")


def _config(cls, **kw):
    from ..core.errors import ProtodiffError

    try:
        return cls(**kw)
    except ValueError as exc:
        errors = getattr(exc, "errors", None)
        if callable(errors):
            e = errors()[0]
            loc = ".".join(str(x) for x in e.get("loc", ()))
            raise ProtodiffError(f"Invalid {loc or 'parameter'}: {e.get('msg', exc)}.") from None
        raise ProtodiffError(str(exc)) from None


def _fmt(ci: dict) -> str:
    v, lo, hi = ci.get("value"), ci.get("low"), ci.get("high")
    if v is None:
        return "n/a"
    return f"{v:.3f} [{lo:.3f}, {hi:.3f}]" if lo is not None and hi is not None else f"{v:.3f}"


@evaluate_app.command("probe")
def probe(
    patches: Path = typer.Option(..., "--patches", help="Labelled patches: a folder of class folders, a CSV "
                                 "(path,label[,group]) or a labelled patch store."),
    encoder: Optional[str] = typer.Option(None, "--encoder", help="Encoder name or path (default: the built-in one)."),
    weights: Optional[str] = typer.Option(None, "--weights", help="Weights file of a named encoder."),
    arch: Optional[str] = typer.Option(None, "--arch", help="timm architecture of a weights file."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps."),
    folds: int = typer.Option(5, "--folds", help="Cross-validation folds (grouped: a group never on both sides)."),
    k: int = typer.Option(20, "--k", help="Neighbours of the k-NN probe."),
    n_boot: int = typer.Option(1000, "--n-boot", help="Bootstrap resamples of the 95% confidence intervals."),
    seed: int = typer.Option(0, "--seed"),
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="Run directory for results.json and predictions.csv."),
    resume: bool = typer.Option(False, "--resume", help="Reuse an existing run directory of this same job."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Linear probe and k-NN on frozen features: balanced accuracy, macro-F1, AUC with 95% CIs."""
    from ..core.evaluation.probe import ProbeConfig
    from ..core.evaluation.runs import evaluate_probe
    from ..core.interrupts import cancel_on_signals

    cfg = _config(ProbeConfig, encoder=encoder, weights=weights, arch=arch, device=device, folds=folds, k=k,
                  n_boot=n_boot, seed=seed)
    with cancel_on_signals():
        result, rd = run_with_progress(evaluate_probe(patches, out, cfg, resume=resume), quiet=quiet or as_json)
    d = result.to_dict()
    if rd is not None:
        d["run_dir"] = str(rd.path)
    if as_json:
        print_json(d)
        return
    typer.echo(f"{d['source']}: {d['n_patches']} patches, {d['n_groups']} groups, classes {', '.join(d['classes'])}; "
               f"encoder {d['encoder'].get('name')}, {d['folds']} grouped folds")
    for p, ms in d["metrics"].items():
        typer.echo(f"  {p:<7} " + "  ".join(f"{m} {_fmt(ci)}" for m, ci in ms.items()))


@evaluate_app.command("mil")
def mil(
    cohort: Path = typer.Option(..., "--cohort", help="Cohort CSV: slide, patient, and label and/or time, event [, fold]."),
    store: Path = typer.Option(..., "--store", help="Patch store holding the cohort's tiled slides."),
    out: Path = typer.Option(..., "-o", "--out", help="Run directory for results, predictions, attention maps, plots."),
    encoder: Optional[str] = typer.Option(None, "--encoder", help="Encoder name or path (default: the built-in one)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps."),
    task: str = typer.Option("auto", "--task", help="classification, survival, or auto (classification if labelled)."),
    loss: str = typer.Option("nll", "--loss", help="Survival loss: nll (discrete-time hazard) or cox."),
    folds: int = typer.Option(5, "--folds", help="Cross-validation folds, split by patient."),
    epochs: int = typer.Option(40, "--epochs"),
    lr: float = typer.Option(1e-3, "--lr"),
    n_boot: int = typer.Option(1000, "--n-boot", help="Bootstrap resamples of the 95% confidence intervals."),
    seed: int = typer.Option(0, "--seed"),
    resume: bool = typer.Option(False, "--resume", help="Reuse an existing run directory of this same job."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Gated-attention MIL with patient-grouped cross-validation: AUC/balanced accuracy/F1 or C-index with 95% CIs."""
    from ..core.evaluation.mil import MILConfig
    from ..core.evaluation.runs import evaluate_mil
    from ..core.interrupts import cancel_on_signals

    cfg = _config(MILConfig, task=task, loss=loss, folds=folds, epochs=epochs, lr=lr, n_boot=n_boot, seed=seed,
                  device="auto" if device == "auto" else device)
    with cancel_on_signals():
        result, rd = run_with_progress(evaluate_mil(cohort, store, out, cfg, encoder=encoder, device=device,
                                                    resume=resume), quiet=quiet or as_json)
    d = result.to_dict()
    d["run_dir"] = str(rd.path)
    if as_json:
        print_json(d)
        return
    typer.echo(f"{cohort}: {d['n_slides']} slides of {d['n_patients']} patients, {d['task']}"
               f"{' (' + d['loss'] + ' loss)' if d['loss'] else ''}, encoder {d['encoder'].get('name')}, {d['folds']} folds")
    for m, ci in d["metrics"].items():
        typer.echo(f"  {m:<18} {_fmt(ci)}")
    if d.get("logrank"):
        typer.echo(f"  log-rank (risk halves) p = {d['logrank']['p_value']:.3g}")
    typer.echo(f"results, predictions, attention maps and plots in {rd.outputs}")


@app.command("study")
def study(
    config: Optional[Path] = typer.Argument(None, help="Study config (JSON or YAML): real stores, arms, encoders, tasks."),
    out: Path = typer.Option(..., "-o", "--out", help="Run directory of the study (report in outputs/report.md)."),
    demo: Optional[Path] = typer.Option(None, "--demo", help="Write a tiny study on the bundled slide into this folder "
                                        "(store, planted cohort, study.json) and run it instead of CONFIG."),
    demo_quick: bool = typer.Option(False, "--demo-quick", help="With --demo: only the random and built-in encoders."),
    resume: bool = typer.Option(False, "--resume", help="Continue a stopped study in the same run directory."),
    as_json: bool = typer.Option(False, "--json", help="Print the results table as JSON."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """The data-efficiency study: pretrain encoders on real, synthetic, hybrid, unguided patches (and a random
    baseline), evaluate them and any user-supplied encoders on the same tasks, and write a report."""
    from ..core.errors import ProtodiffError
    from ..core.interrupts import cancel_on_signals
    from ..core.evaluation.study import load_study_config, run_study, write_demo_study

    with cancel_on_signals():  # SIGTERM / Ctrl-C: the study (and its current stage) ends "cancelled"
        if demo is not None:
            config = run_with_progress(write_demo_study(demo, full=not demo_quick), quiet=quiet or as_json)
        elif config is None:
            raise ProtodiffError("Give a study config file (or --demo FOLDER for the tiny demo study).")
        cfg = load_study_config(config)
        rows, report, rd = run_with_progress(run_study(cfg, out, resume=resume), quiet=quiet or as_json)
    if as_json:
        print_json({"run_dir": str(rd.path), "report": str(report), "table": rows})
        return
    from ..core.evaluation.compare import table_markdown

    typer.echo(table_markdown(rows))
    typer.echo(f"report: {report}")
