"""``protodiff pretrain``: DINO pretraining of a ViT on real, synthetic or hybrid patch stores."""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

import typer

from . import app
from ._common import print_json, run_with_progress


@app.command()
def pretrain(
    output: Path = typer.Option(..., "-o", "--output", help="Run directory (created; or resumed with --resume)."),
    real: List[Path] = typer.Option([], "--real", help="Patch store of real patches (repeatable)."),
    synthetic: List[Path] = typer.Option([], "--synthetic", help="Patch store of synthetic patches (repeatable)."),
    real_fraction: Optional[float] = typer.Option(None, "--real-fraction",
                                                  help="Share of real images per epoch, 0-1 (default: 1 with only "
                                                       "--real, 0 with only --synthetic)."),
    preset: str = typer.Option("tiny", "--preset", help="tiny (CPU minutes), small or base: defaults for the rest."),
    arch: str = typer.Option("vit_tiny", "--arch", help="vit_tiny, vit_small or vit_base (timm, trained from scratch)."),
    patch_size: Optional[int] = typer.Option(None, "--patch-size", help="ViT patch (token) size in px."),
    global_size: Optional[int] = typer.Option(None, "--global-size", help="Global crop side (px)."),
    local_size: Optional[int] = typer.Option(None, "--local-size", help="Local crop side (px)."),
    n_local: Optional[int] = typer.Option(None, "--n-local", help="Local crops per image."),
    out_dim: Optional[int] = typer.Option(None, "--out-dim", help="DINO head output dimension (prototypes)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Images per step (per process)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Epochs."),
    images_per_epoch: Optional[int] = typer.Option(None, "--images-per-epoch", help="Images drawn per epoch."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate at batch 256 (scaled linearly)."),
    warmup_epochs: Optional[int] = typer.Option(None, "--warmup-epochs", help="Learning-rate warm-up epochs."),
    resize: bool = typer.Option(False, "--resize", help="Resample stores of another µm/px to the first store's."),
    seed: int = typer.Option(0, "--seed", help="Seed of weights, sampling and augmentations."),
    workers: int = typer.Option(2, "--workers", help="Data-loading worker processes (0: none)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Torch threads of the training process."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    checkpoint_every: int = typer.Option(50, "--checkpoint-every", help="Steps between checkpoints."),
    resume: bool = typer.Option(False, "--resume", help="Continue the interrupted run in this run directory."),
    name: Optional[str] = typer.Option(None, "--name", help="Register the exported encoder under this name."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Pretrain a ViT with DINO; the teacher backbone is exported to RUN_DIR/outputs/encoder (use it as --encoder RUN_DIR)."""
    # OpenMP threads that spin while waiting stall badly when the CPU is shared (other jobs,
    # the loader's workers, a viewer); waiting passively costs little here. Set before torch loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from ..core.errors import ProtodiffError
    from ..core.ssl.config import PretrainConfig
    from ..core.errors import validation_message

    if real_fraction is None:
        real_fraction = 1.0 if real else 0.0
    for p in [*real, *synthetic]:
        if not p.exists():
            raise ProtodiffError(f"{p}: no such patch store.")
    values = dict(real=[str(p) for p in real], synthetic=[str(p) for p in synthetic], real_fraction=real_fraction,
                  preset=preset, arch=arch, patch_size=patch_size, global_size=global_size, local_size=local_size,
                  n_local=n_local, out_dim=out_dim, batch_size=batch_size, epochs=epochs,
                  images_per_epoch=images_per_epoch, lr=lr, warmup_epochs=warmup_epochs, resize=resize, seed=seed,
                  workers=workers, threads=threads, device=device, checkpoint_every=checkpoint_every)
    try:
        cfg = PretrainConfig(**values)
    except ValueError as exc:
        raise ProtodiffError(validation_message(exc)) from None
    result = run_pretrain(cfg, output, resume=resume, quiet=quiet or as_json)
    if result is None:  # not process 0 of a torchrun job
        return
    if name:
        from ..core.ssl.export import register_encoder

        register_encoder(name, result.encoder)
    if as_json:
        print_json(result.to_dict())
        return
    loss = (f"loss {result.first_loss:.4f} -> {result.last_loss:.4f}" if result.first_loss is not None
            and result.last_loss is not None else "")
    typer.echo(f"pretrained {cfg.arch} for {result.steps} steps ({result.epochs} epochs) in {result.seconds:.0f} s"
               f"{'; ' + loss if loss else ''}")
    typer.echo(f"encoder: {result.encoder}" + (f" (registered as '{name}')" if name else "")
               + f"; use it as --encoder {output}")


def run_pretrain(cfg, output: Path, resume: bool = False, quiet: bool = False):
    """Run the job with a progress bar (process 0 of a torchrun job only); returns its result there."""
    from ..core.ssl.train import pretrain as job

    rank = int(os.environ.get("RANK", 0))
    result = run_with_progress(job(cfg, output, resume=resume), quiet=quiet or rank != 0)
    return result if rank == 0 else None
