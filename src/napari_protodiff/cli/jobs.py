"""``protodiff jobs list`` and ``protodiff jobs show``: the run directories of long stages."""

from __future__ import annotations

from pathlib import Path

import typer

from . import app
from ._common import print_json

jobs_app = typer.Typer(help="List and inspect run directories (pretraining, training, sampling, evaluation, ...).",
                       no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")


@jobs_app.command("list")
def list_jobs(
    root: Path = typer.Argument(Path("."), help="Folder to search for run directories (3 levels deep)."),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON."),
) -> None:
    """Every run directory under ROOT with its kind, state and progress."""
    from ..core.jobs import find_runs

    runs = [r.summary() for r in find_runs(root)]
    if as_json:
        print_json(runs)
        return
    if not runs:
        typer.echo(f"no run directory under {root}")
        return
    for r in runs:
        prog = f"{r['step']}/{r['total']}" if r.get("total") else ""
        typer.echo(f"{r['state']:<12} {str(r['kind']):<10} {prog:>12}  {r['path']}")


@jobs_app.command("show")
def show_job(
    run_dir: Path = typer.Argument(..., help="A run directory."),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON."),
) -> None:
    """A run's state, progress, last metrics, outputs and how to resume it."""
    from ..core.jobs import RunDir

    rd = RunDir.open(run_dir)
    s = rd.summary()
    if as_json:
        print_json(s)
        return
    typer.echo(f"{s['path']}")
    typer.echo(f"  kind        {s['kind']}")
    typer.echo(f"  state       {s['state']}" + (f": {s['error']}" if s.get("error") else ""))
    if s.get("total"):
        typer.echo(f"  progress    {s['step']}/{s['total']} ({100 * (s['step'] or 0) / s['total']:.0f} %)")
    typer.echo(f"  message     {s['message']}")
    typer.echo(f"  updated     {s['updated']}")
    m = s.get("last_metrics")
    if m:
        typer.echo("  last metrics " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                for k, v in m.items()))
    typer.echo(f"  checkpoints {', '.join(s['checkpoints']) or 'none'}")
    typer.echo(f"  outputs     {', '.join(s['outputs']) or 'none'}")
    if s["state"] in ("cancelled", "failed", "interrupted"):
        typer.echo(f"  resume      repeat the command with --resume (argv in {rd.path / 'manifest.json'})")
