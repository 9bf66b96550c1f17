"""``train_diffusion``: autoencoder, then latent UNet, then noise-aware classifier, then the bundle.

A generator of :class:`~napari_protodiff.core.progress.Progress` events (steps of all
three models together), resumable: the run's state lives in ``MODEL_DIR/training/``
(config, each finished model, the current model's last checkpoint), so running the
same command again continues where it stopped; a finished model is refused unless
``overwrite``. Under ``torchrun`` every rank runs this same function (DDP); rank 0
writes the files.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..errors import ProtodiffError
from ..progress import CancelToken, Progress
from .bundle import META_FILE, save_bundle
from .config import DiffusionConfig
from .errors import ModelError

HOLDOUT = 64


def _relay(gen, offset: int, total: int):
    """Forward a stage's progress as steps of the whole run; return the stage's value."""
    try:
        while True:
            ev = next(gen)
            yield Progress(offset + ev.step, total, ev.message, ev.metrics)
    except StopIteration as stop:
        return stop.value


def _check_output(out: Path, cfg: DiffusionConfig, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ModelError(f"{out}: exists and is a file, not a model folder.")
    if (out / META_FILE).exists():
        if not overwrite:
            raise ModelError(f"{out}: already holds a trained model; pass --overwrite or choose another folder.")
        shutil.rmtree(out)
    elif out.exists() and any(out.iterdir()) and not (out / "training").exists():
        raise ModelError(f"{out}: exists and is not a protodiff model folder; choose another output.")
    saved = out / "training" / "config.json"
    if saved.exists() and not overwrite:
        old = json.loads(saved.read_text())
        if old != json.loads(cfg.model_dump_json()):
            raise ModelError(f"{out}: an unfinished training run with another configuration is there; "
                             "pass --overwrite to start over or the same options to resume.")
    elif saved.exists():
        shutil.rmtree(out)


def train_diffusion(store: str | os.PathLike, output: str | os.PathLike, config: DiffusionConfig | None = None,
                    overwrite: bool = False, cancel: CancelToken | None = None) -> Iterator[Progress]:
    """Train the three models on ``store`` and save the bundle in ``output``; returns a metrics dict."""
    import torch
    from diffusers import AutoencoderKL, UNet2DModel

    from .autoencoder import (autoencoder_loss, build_autoencoder, encode_latents, reconstruction_quality,
                              set_scaling_factor)
    from .classifier import (NoiseAwareClassifier, build_classifier, classifier_accuracy, classifier_loss, flops)
    from .data import load_patch_data
    from .pipeline import PrototypeGuidedPipeline
    from .training import LoopSettings, dist_info, resolve_device, train_loop
    from .unet import build_scheduler, build_unet, diffusion_loss

    cfg = config or DiffusionConfig.from_preset("tiny")
    out = Path(output)
    rank, world = dist_info()
    if rank == 0:
        _check_output(out, cfg, overwrite)
    if world > 1:
        torch.distributed.barrier()
    yield Progress(0, 0, f"reading patches from {store}")
    data = load_patch_data(store, cfg.image_size, cfg.max_patches, cfg.seed)
    k = data.prototypes.k
    counts = np.bincount(data.labels, minlength=k)
    if k < 2:
        raise ProtodiffError(f"{store}: guidance needs at least 2 prototypes; the store has {k}.")
    if len(data) < 2 * HOLDOUT // 4 + 8:
        raise ProtodiffError(f"{store}: only {len(data)} patches; train-diffusion needs at least {2 * HOLDOUT // 4 + 8}.")
    train, held = data.split(HOLDOUT, cfg.seed)
    device = resolve_device(cfg.device)
    work = out / "training"
    if rank == 0:
        work.mkdir(parents=True, exist_ok=True)
        (work / "config.json").write_text(cfg.model_dump_json(indent=2))
    if world > 1:
        torch.distributed.barrier()
    total = cfg.autoencoder.steps + cfg.unet.steps + cfg.classifier.steps
    common = dict(seed=cfg.seed, grad_clip=cfg.grad_clip, weight_decay=cfg.weight_decay,
                  checkpoint_every=cfg.checkpoint_every, mixed_precision=cfg.mixed_precision,
                  gradient_checkpointing=cfg.gradient_checkpointing)
    metrics: dict[str, Any] = {"n_train": len(train), "n_holdout": len(held), "prototype_counts": counts.tolist(),
                               "world_size": world, "device": str(device)}

    # 1. autoencoder ---------------------------------------------------------------------------------
    if (work / "vae" / "config.json").exists():
        vae = AutoencoderKL.from_pretrained(str(work / "vae"), use_safetensors=True, low_cpu_mem_usage=False).to(device)
        ae_metrics = json.loads((work / "vae_metrics.json").read_text())
    else:
        torch.manual_seed(cfg.seed)
        vae = build_autoencoder(cfg.autoencoder, cfg.image_size)
        x_train = train

        def ae_loss(model, idx, gen):
            return autoencoder_loss(model, x_train.images(idx, device), cfg.autoencoder.kl_weight)

        a = cfg.autoencoder
        ae_metrics = yield from _relay(train_loop(vae, ae_loss, len(train), LoopSettings(
            "autoencoder", a.steps, a.batch_size, a.lr, **common), work / "ckpt-vae", device, cancel), 0, total)
        sf = set_scaling_factor(vae, train.images(np.arange(min(len(train), 1024)), device))
        ae_metrics.update(scaling_factor=round(sf, 5), holdout=reconstruction_quality(vae, held.images(None, device)))
        if rank == 0:
            vae.save_pretrained(str(work / "vae"), safe_serialization=True)
            (work / "vae_metrics.json").write_text(json.dumps(ae_metrics))
    vae.eval().requires_grad_(False)
    metrics["autoencoder"] = ae_metrics
    yield Progress(cfg.autoencoder.steps, total, "encoding latents")
    z_train = encode_latents(vae, train.images(None, device))
    z_held = encode_latents(vae, held.images(None, device))
    y_train = torch.from_numpy(train.labels).to(device)
    sched = build_scheduler(cfg, "ddpm")

    # 2. UNet ----------------------------------------------------------------------------------------
    n_cond = k if cfg.unet.class_conditional else None
    if (work / "unet" / "config.json").exists():
        unet = UNet2DModel.from_pretrained(str(work / "unet"), use_safetensors=True, low_cpu_mem_usage=False).to(device)
        unet_metrics = json.loads((work / "unet_metrics.json").read_text())
    else:
        torch.manual_seed(cfg.seed + 1)
        unet = build_unet(cfg, n_cond)

        def unet_loss(model, idx, gen):
            ti = torch.from_numpy(idx).to(device)
            labels = None
            if n_cond:
                labels = y_train[ti].clone()
                drop = torch.rand(len(ti), generator=gen, device=device) < cfg.unet.cond_dropout
                labels[drop] = k
            return diffusion_loss(model, sched, z_train[ti], gen, labels)

        u = cfg.unet
        unet_metrics = yield from _relay(train_loop(unet, unet_loss, len(train), LoopSettings(
            "unet", u.steps, u.batch_size, u.lr, ema_decay=cfg.ema_decay, **common), work / "ckpt-unet", device,
            cancel), cfg.autoencoder.steps, total)
        if rank == 0:
            unet.save_pretrained(str(work / "unet"), safe_serialization=True)
            (work / "unet_metrics.json").write_text(json.dumps(unet_metrics))
    unet.eval().requires_grad_(False)
    metrics["unet"] = unet_metrics

    # 3. noise-aware classifier ----------------------------------------------------------------------
    if (work / "classifier" / "config.json").exists():
        clf = NoiseAwareClassifier.from_pretrained(str(work / "classifier"), use_safetensors=True, low_cpu_mem_usage=False).to(device)
        clf_metrics = json.loads((work / "classifier_metrics.json").read_text())
    else:
        torch.manual_seed(cfg.seed + 2)
        clf = build_classifier(cfg, k)

        def clf_loss(model, idx, gen):
            ti = torch.from_numpy(idx).to(device)
            return classifier_loss(model, sched, z_train[ti], y_train[ti], gen)

        c = cfg.classifier
        clf_metrics = yield from _relay(train_loop(clf, clf_loss, len(train), LoopSettings(
            "classifier", c.steps, c.batch_size, c.lr, **common), work / "ckpt-classifier", device, cancel),
            cfg.autoencoder.steps + cfg.unet.steps, total)
        clf.eval()
        y_held = torch.from_numpy(held.labels).to(device)
        clf_metrics["holdout_accuracy"] = classifier_accuracy(clf, sched, z_held, y_held, seed=cfg.seed)
        zz = z_held[:1]
        tt = torch.zeros(1, dtype=torch.long, device=device)
        unet_in = (zz, tt) + ((torch.full((1,), k, dtype=torch.long, device=device),) if n_cond else ())
        clf_metrics["flops_ratio_to_unet"] = round(flops(clf, zz, tt) / max(1, flops(unet, *unet_in)), 4)
        if rank == 0:
            clf.save_pretrained(str(work / "classifier"), safe_serialization=True)
            (work / "classifier_metrics.json").write_text(json.dumps(clf_metrics))
    metrics["classifier"] = clf_metrics

    # 4. the bundle -----------------------------------------------------------------------------------
    pipe = PrototypeGuidedPipeline(vae=vae, unet=unet, scheduler=build_scheduler(cfg, "ddim"), classifier=clf)
    pipe.prototype_centroids = data.prototypes.centroids
    pipe.encoder_identity = data.prototypes.encoder
    pipe.protodiff_meta = {"store": str(Path(store).resolve()), "image_size": cfg.image_size,
                           "patch_mpp": data.patch_mpp, "prototype_encoder": data.prototypes.encoder.get("name"),
                           "train_index_count": len(train)}
    if rank == 0:
        digest = save_bundle(pipe, out, metrics=metrics, config=json.loads(cfg.model_dump_json()))
        metrics["model_hash"] = digest
        for ck in work.glob("ckpt-*"):
            shutil.rmtree(ck, ignore_errors=True)
    if world > 1:
        torch.distributed.barrier()
    yield Progress(total, total, "saved " + str(out))
    return metrics
