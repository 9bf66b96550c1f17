"""``protodiff train-diffusion``, ``protodiff sample`` and ``protodiff fidelity``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from . import app
from ._common import print_json, run_with_progress


def _config_error(exc: Exception):
    from ..core.errors import ProtodiffError, validation_message

    return ProtodiffError(validation_message(exc)) if isinstance(exc, ValueError) else exc


def _threads(threads: Optional[int]) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


@app.command("train-diffusion")
def train_diffusion_cmd(
    store: Path = typer.Argument(..., help="Patch store with prototypes."),
    output: Path = typer.Option(..., "-o", "--output", help="Model folder to write (resumes an unfinished one)."),
    preset: str = typer.Option("tiny", "--preset", help="tiny (CPU minutes), small (GPU), base (paper scale)."),
    seed: int = typer.Option(0, "--seed", help="Seed of initialisation, data order and noise."),
    ae_steps: Optional[int] = typer.Option(None, "--ae-steps", help="Autoencoder training steps (preset's if unset)."),
    unet_steps: Optional[int] = typer.Option(None, "--unet-steps", help="UNet training steps."),
    classifier_steps: Optional[int] = typer.Option(None, "--classifier-steps", help="Classifier training steps."),
    downsample: Optional[int] = typer.Option(None, "--downsample", help="Autoencoder downsampling factor, 4 or 8."),
    prediction: Optional[str] = typer.Option(None, "--prediction", help="epsilon or v_prediction."),
    cfg: bool = typer.Option(False, "--cfg", help="Also train the UNet on prototype ids (classifier-free guidance)."),
    max_patches: Optional[int] = typer.Option(None, "--max-patches", help="Train on at most this many patches."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for torch."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a finished or differently configured model."),
    as_json: bool = typer.Option(False, "--json", help="Print the training metrics as JSON."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Train autoencoder, latent diffusion UNet and noise-aware prototype classifier on a patch store.

    Multi-GPU / multi-process: torchrun --nproc_per_node N -m napari_protodiff.cli train-diffusion ...
    """
    from ..core.diffusion.config import DiffusionConfig
    from ..core.diffusion.fit import train_diffusion
    from ..core.diffusion.training import dist_info, init_distributed

    _threads(threads)
    overrides: dict = {"seed": seed, "device": device, "max_patches": max_patches, "prediction_type": prediction}
    ae = {k: v for k, v in (("steps", ae_steps), ("downsample", downsample)) if v is not None}
    unet = {k: v for k, v in (("steps", unet_steps), ("class_conditional", cfg or None)) if v is not None}
    if classifier_steps is not None:
        overrides["classifier"] = {"steps": classifier_steps}
    try:
        if downsample is not None:  # 4x: three levels, 8x: four (the preset's widths, last one repeated)
            base = list(DiffusionConfig.from_preset(preset).autoencoder.block_out_channels)
            ae["block_out_channels"] = tuple(base[:3]) if downsample == 4 else tuple(base[:3] + base[-1:])
        config = DiffusionConfig.from_preset(preset, autoencoder=ae or None, unet=unet or None, **overrides)
    except ValueError as exc:
        raise _config_error(exc) from None
    init_distributed()
    rank, _ = dist_info()
    metrics = run_with_progress(train_diffusion(store, output, config, overwrite=overwrite),
                                quiet=quiet or as_json or rank != 0)
    if rank != 0:
        return
    if as_json:
        print_json(metrics)
        return
    ae_q = metrics["autoencoder"].get("holdout", {})
    clf = metrics["classifier"]
    typer.echo(f"trained on {metrics['n_train']} patches ({len(metrics['prototype_counts'])} prototypes) -> {output}")
    typer.echo(f"  autoencoder  reconstruction PSNR {ae_q.get('psnr_db')} dB on {ae_q.get('n')} held-out patches")
    typer.echo(f"  unet         final loss {metrics['unet'].get('final_loss')}")
    typer.echo(f"  classifier   held-out accuracy by noise level {clf.get('holdout_accuracy')}; "
               f"{clf.get('flops_ratio_to_unet', 0):.1%} of the UNet's FLOPs")
    typer.echo(f"  model hash   {metrics.get('model_hash')}")


@app.command()
def sample(
    model: Path = typer.Argument(..., help="Model folder from train-diffusion."),
    n: int = typer.Option(64, "-n", help="Number of synthetic patches."),
    output: Path = typer.Option(..., "-o", "--output", help="Synthetic patch store (.zarr) to create or append to."),
    prototypes: str = typer.Option("balanced", "--prototypes", help="all | balanced | 3,5 | 3:0.7,5:0.3"),
    guidance: float = typer.Option(3.0, "--guidance", help="Classifier-guidance scale (0: unguided)."),
    guidance_min_t: float = typer.Option(0.4, "--guidance-min-t",  # = SampleConfig's
                                         help="Guide only at noise levels t/T of at least this (0: every step)."),
    cfg_scale: Optional[float] = typer.Option(None, "--cfg-scale", help="Classifier-free guidance scale (a --cfg model)."),
    steps: int = typer.Option(50, "--steps", help="Denoising steps."),
    scheduler: str = typer.Option("ddim", "--scheduler", help="ddim, ddpm or dpm++."),
    seed: int = typer.Option(0, "--seed", help="Seed of the first patch (patch i uses seed + i)."),
    batch_size: int = typer.Option(64, "--batch-size", help="Patches per batch (one resumable block each)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for torch."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Sample prototype-guided synthetic patches into a synthetic patch store (resumable)."""
    from ..core.diffusion.config import SampleConfig
    from ..core.diffusion.errors import SamplingError
    from ..core.diffusion.synthesize import synthesize

    if n < 1:
        raise SamplingError(f"The number of samples (-n) must be at least 1, not {n}.")
    _threads(threads)
    try:
        cfg = SampleConfig(n=n, prototypes=prototypes, guidance=guidance, guidance_min_t=guidance_min_t,
                           cfg_scale=cfg_scale, steps=steps,
                           scheduler=scheduler, seed=seed, batch_size=batch_size, device=device)
    except ValueError as exc:
        raise _config_error(exc) from None
    result = run_with_progress(synthesize(model, output, cfg), quiet=quiet or as_json)
    if as_json:
        print_json(result.to_dict())
        return
    verb = {"new": "sampled", "resume": "resumed", "skip": "already complete"}[result.action]
    typer.echo(f"{result.run_id}: {result.n} patches ({verb}, {result.written} written in {result.seconds:.1f} s, "
               f"{result.images_per_second:.1f} images/s) -> {result.store}")


@app.command()
def fidelity(
    real: Path = typer.Argument(..., help="Real patch store (with prototypes)."),
    synthetic: Path = typer.Argument(..., help="Synthetic patch store from protodiff sample."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for fidelity.json and plots (default: next to SYNTH)."),
    k: int = typer.Option(5, "--k", help="Neighbours for precision/recall/density/coverage."),
    max_real: int = typer.Option(4000, "--max-real", help="Real patches compared (random subset beyond)."),
    max_synthetic: int = typer.Option(4000, "--max-synthetic", help="Synthetic patches per run compared."),
    near_copy_quantile: float = typer.Option(0.01, "--near-copy-quantile",
                                             help="A synthetic patch closer to a real one than this quantile of "
                                                  "real-to-real distances is a near-copy."),
    seed: int = typer.Option(0, "--seed"),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for torch."),
    as_json: bool = typer.Option(False, "--json", help="Print the numbers as JSON."),
) -> None:
    """Prototype hit rate, Fréchet distance, PRDC and a memorisation audit, per sampling run and prototype."""
    from ..core.diffusion.fidelity import evaluate_fidelity, save_plots, strip_arrays
    from ..core.errors import ProtodiffError

    if k < 1:
        raise ProtodiffError(f"--k must be at least 1, not {k}.")
    if not 0 < near_copy_quantile < 1:
        raise ProtodiffError(f"--near-copy-quantile must lie between 0 and 1, not {near_copy_quantile}.")
    _threads(threads)
    report = evaluate_fidelity(real, synthetic, k=k, max_real=max_real, max_synth=max_synthetic,
                               near_copy_quantile=near_copy_quantile, seed=seed, keep_arrays=True)
    folder = out or synthetic.with_name(synthetic.name.removesuffix(".zarr") + "-fidelity")
    plots = save_plots(report, folder)
    clean = strip_arrays(report)
    clean["plots"] = plots
    (Path(folder) / "fidelity.json").write_text(json.dumps(clean, indent=2, default=str))
    if as_json:
        print_json(clean)
        return
    typer.echo(f"real {clean['real_store']} ({clean['n_real']} patches) vs synthetic {clean['synthetic_store']}; "
               f"features: {clean['encoder'].get('name')}")
    typer.echo(f"{'run':<14}{'guidance':>9}{'n':>6}{'hit rate':>10}{'FD':>9}{'prec':>7}{'rec':>7}{'dens':>7}"
               f"{'cov':>7}{'near-copies':>13}")
    for r in clean["runs"]:
        g = r["guidance"] if r.get("cfg_scale") is None else f"cfg {r['cfg_scale']}"
        mem = r["memorisation"]["pixels"]
        typer.echo(f"{r['run_id']:<14}{g!s:>9}{r['n']:>6}{r['hit']['hit_rate']:>10.3f}{r['frechet_distance']:>9.3f}"
                   f"{r['precision']:>7.3f}{r['recall']:>7.3f}{r['density']:>7.3f}{r['coverage']:>7.3f}"
                   f"{mem['near_copies']:>6} ({mem['near_copy_share']:.1%})")
        for p, v in sorted(r["per_prototype"].items(), key=lambda kv: int(kv[0])):
            hr = r["hit"]["per_prototype"].get(int(p), float("nan"))
            typer.echo(f"  prototype {p!s:<4}{'':>9}{v['n_synthetic']:>6}{hr:>10.3f}{v['frechet_distance']:>9.3f}"
                       f"{v['precision']:>7.3f}{v['recall']:>7.3f}{v['density']:>7.3f}{v['coverage']:>7.3f}")
    typer.echo(f"saved {Path(folder) / 'fidelity.json'} and {len(plots)} plot(s) in {folder}")
