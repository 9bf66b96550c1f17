"""Saving and loading a whole prototype-guided diffusion model folder (safetensors only).

Layout of ``MODEL_DIR`` (diffusers' pipeline layout plus two protodiff parts)::

    model_index.json               diffusers' index of the parts
    vae/                           AutoencoderKL: config.json + diffusion_pytorch_model.safetensors
    unet/                          UNet2DModel:   config.json + diffusion_pytorch_model.safetensors
    classifier/                    NoiseAwareClassifier: config.json + ...safetensors (optional)
    scheduler/                     scheduler_config.json
    prototypes/                    centroids.safetensors, prototypes.json (encoder identity, k)
    protodiff.json                 format version, package version, training config and metrics,
                                   model hash; written LAST: a folder without it is incomplete

Loading never unpickles: each part is read with ``use_safetensors=True`` from its own
class (no class named by the folder is imported), and every problem (a missing part,
another format version, a mismatch between parts) is one sentence
(:class:`~napari_protodiff.core.diffusion.errors.ModelError`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from ..store import now
from .errors import ModelError

BUNDLE_KIND = "protodiff-diffusion-model"
BUNDLE_VERSION = 1
META_FILE = "protodiff.json"
SCHEDULERS = {"DDIMScheduler", "DDPMScheduler", "DPMSolverMultistepScheduler"}


def model_hash(folder: str | os.PathLike) -> str:
    """sha256 over every weight and config file of a model folder (protodiff.json excluded)."""
    root = Path(folder)
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel != META_FILE and not rel.startswith("training/") and \
                p.suffix in (".safetensors", ".json"):
            h.update(rel.encode())
            h.update(p.read_bytes())
    return "sha256:" + h.hexdigest()


def save_bundle(pipe, folder: str | os.PathLike, metrics: dict | None = None, config: dict | None = None,
                **kwargs: Any) -> str:
    """Write ``pipe`` to ``folder`` (see the module docstring); returns the model hash."""
    from safetensors.torch import save_file
    import torch

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    (out / META_FILE).unlink(missing_ok=True)  # incomplete until the end
    for part in ("vae", "unet", "classifier", "scheduler", "prototypes"):
        shutil.rmtree(out / part, ignore_errors=True)
    # diffusers' DiffusionPipeline.save_pretrained: each part's save_pretrained in safetensors
    from diffusers import DiffusionPipeline

    DiffusionPipeline.save_pretrained(pipe, str(out), safe_serialization=True)
    for part in ("vae", "unet", "classifier"):  # parts diffusers' loop skipped (our classifier)
        model = getattr(pipe, part, None)
        if model is not None and not (out / part / "config.json").exists():
            model.save_pretrained(str(out / part), safe_serialization=True)
    (out / "prototypes").mkdir(exist_ok=True)
    if pipe.prototype_centroids is not None:
        save_file({"centroids": torch.from_numpy(np.ascontiguousarray(pipe.prototype_centroids, np.float32))},
                  str(out / "prototypes" / "centroids.safetensors"))
    (out / "prototypes" / "prototypes.json").write_text(json.dumps(
        {"k": pipe.num_prototypes, "encoder": pipe.encoder_identity}, indent=2))
    from ..._version import __version__

    meta = dict(pipe.protodiff_meta)
    if metrics is not None:
        meta["metrics"] = metrics
    if config is not None:
        meta["config"] = config
    digest = model_hash(out)
    meta.update(kind=BUNDLE_KIND, format_version=BUNDLE_VERSION, package_version=__version__, saved=now(),
                model_hash=digest, num_prototypes=pipe.num_prototypes)
    tmp = out / (META_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2, default=str))
    os.replace(tmp, out / META_FILE)
    pipe.protodiff_meta = meta
    return digest


def read_meta(folder: str | os.PathLike) -> dict[str, Any]:
    """The checked ``protodiff.json`` of a model folder."""
    root = Path(folder)
    if not root.is_dir():
        raise ModelError(f"{root}: no such model folder.")
    meta_path = root / META_FILE
    if not meta_path.exists():
        if (root / "model_index.json").exists() or (root / "training").exists():
            raise ModelError(f"{root}: the model folder is incomplete (training or saving did not finish; "
                             "run train-diffusion again to resume).")
        raise ModelError(f"{root}: not a protodiff diffusion model folder (no {META_FILE}).")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{meta_path}: unreadable ({exc}).") from None
    if meta.get("kind") != BUNDLE_KIND:
        raise ModelError(f"{root}: {META_FILE} does not describe a protodiff diffusion model.")
    ver = meta.get("format_version")
    if ver != BUNDLE_VERSION:
        raise ModelError(f"{root}: model format version {ver} is not the version this protodiff reads "
                         f"({BUNDLE_VERSION}); retrain it or use the protodiff version that made it.")
    return meta


def load_bundle(folder: str | os.PathLike, device=None):
    """Load a model folder into a :class:`PrototypeGuidedPipeline` (safetensors only)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DModel
    from safetensors.torch import load_file

    from . import unet as _unet
    from .classifier import NoiseAwareClassifier
    from .pipeline import PrototypeGuidedPipeline

    root = Path(folder)
    meta = read_meta(root)
    for part, need in (("vae", True), ("unet", True), ("scheduler", True), ("prototypes", True)):
        if need and not (root / part).is_dir():
            raise ModelError(f"{root}: the model folder has no '{part}' part; it is incomplete or damaged.")
    for part in ("vae", "unet", "classifier"):
        if (root / part).is_dir() and not list((root / part).glob("*.safetensors")):
            raise ModelError(f"{root / part}: no safetensors weights there (other formats are never loaded).")
    try:
        opts = dict(use_safetensors=True, local_files_only=True, low_cpu_mem_usage=False)
        vae = AutoencoderKL.from_pretrained(str(root / "vae"), **opts)
        unet = UNet2DModel.from_pretrained(str(root / "unet"), **opts)
        clf = None
        if (root / "classifier").is_dir():
            clf = NoiseAwareClassifier.from_pretrained(str(root / "classifier"), **opts)
        sched_cfg = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(f"{root}: a part of the model cannot be loaded ({str(exc).splitlines()[0][:200]}).") from None
    if sched_cfg.get("_class_name") not in SCHEDULERS:
        raise ModelError(f"{root}: unknown scheduler '{sched_cfg.get('_class_name')}' in the model folder.")
    name = {"DDIMScheduler": "ddim", "DDPMScheduler": "ddpm", "DPMSolverMultistepScheduler": "dpm++"}[
        sched_cfg["_class_name"]]
    scheduler = _unet.scheduler_from(sched_cfg, name)
    if unet.config.in_channels != vae.config.latent_channels:
        raise ModelError(f"{root}: the UNet ({unet.config.in_channels} channels) does not fit the autoencoder's "
                         f"latents ({vae.config.latent_channels} channels).")
    pjson = root / "prototypes" / "prototypes.json"
    if not pjson.exists():
        raise ModelError(f"{root}: prototypes/prototypes.json is missing; the model folder is incomplete.")
    pinfo = json.loads(pjson.read_text())
    pipe = PrototypeGuidedPipeline(vae=vae, unet=unet, scheduler=scheduler, classifier=clf)
    cpath = root / "prototypes" / "centroids.safetensors"
    if cpath.exists():
        pipe.prototype_centroids = load_file(str(cpath))["centroids"].numpy()
        if clf is not None and pipe.prototype_centroids.shape[0] != clf.config.num_prototypes:
            raise ModelError(f"{root}: {pipe.prototype_centroids.shape[0]} prototype centroids but a classifier "
                             f"for {clf.config.num_prototypes} prototypes.")
    pipe.encoder_identity = dict(pinfo.get("encoder") or {})
    pipe.protodiff_meta = meta
    if device is not None:
        pipe.to(torch.device(device) if isinstance(device, str) else device)
    for m in (vae, unet, clf):
        if m is not None:
            m.eval()
    return pipe
