"""The trained teacher backbone as an encoder: ``model.safetensors`` + ``config.json``, and loading it back.

An exported encoder is a folder::

    encoder/
      model.safetensors   the timm ViT's state dict (no classifier), safetensors only: nothing is unpickled
      config.json         {"format": "protodiff-encoder", "library": "timm", "architecture": "vit_tiny_patch16_224",
                           "model_args": {img_size, patch_size, num_classes: 0, dynamic_img_size: true},
                           "embed_dim", "input_size", "mean", "std", "patch_mpp", "patch_px", "training": {...}}

``protodiff pretrain`` writes it to ``RUN_DIR/outputs/encoder``. :func:`resolve_encoder`
accepts that folder, the run directory itself, or a *name* given at export
(``--name``), registered in ``$PROTODIFF_HOME/encoders.json`` (default
``~/.protodiff``). :func:`load_encoder` builds the timm model (never downloading
weights) and loads the safetensors file.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from ..errors import ProtodiffError
from ..jobs import atomic_write_json, now

FORMAT = "protodiff-encoder"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


class EncoderError(ProtodiffError):
    """An exported encoder cannot be found or loaded."""


def protodiff_home() -> Path:
    return Path(os.environ.get("PROTODIFF_HOME") or Path.home() / ".protodiff")


def export_encoder(backbone, dest: str | os.PathLike, config: dict[str, Any]) -> Path:
    """Write ``backbone``'s weights and ``config`` (architecture, input size, normalisation, provenance) to ``dest``."""
    from safetensors.torch import save_file

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()}
    tmp = dest / f".{WEIGHTS}.tmp"
    save_file(state, str(tmp), metadata={"format": FORMAT})
    os.replace(tmp, dest / WEIGHTS)
    cfg = {"format": FORMAT, "format_version": FORMAT_VERSION, "exported": now(), **config}
    atomic_write_json(dest / CONFIG, cfg)
    return dest


def encoder_config(cfg, embed_dim: int, patch_mpp: float, patch_px: int, training: dict[str, Any]) -> dict[str, Any]:
    """The config.json of an encoder trained with :class:`~.config.PretrainConfig` ``cfg``."""
    from .augment import IMAGENET_MEAN, IMAGENET_STD

    return {
        "library": "timm",
        "architecture": cfg.timm_name,
        "arch": cfg.arch,
        "model_args": {"img_size": cfg.global_size, "patch_size": cfg.patch_size, "num_classes": 0,
                       "dynamic_img_size": True},
        "embed_dim": int(embed_dim),
        "input_size": cfg.global_size,
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "patch_mpp": patch_mpp,
        "patch_px": patch_px,
        "training": training,
    }


def register_encoder(name: str, path: str | os.PathLike) -> Path:
    """Make ``name`` refer to the encoder folder ``path`` (in ``$PROTODIFF_HOME/encoders.json``)."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise EncoderError(f"'{name}': an encoder name may hold letters, digits, '.', '_' and '-' only.")
    folder = Path(path).resolve()
    read_encoder_config(folder)  # must be a valid encoder
    index = protodiff_home() / "encoders.json"
    index.parent.mkdir(parents=True, exist_ok=True)
    data = registered_encoders()
    data[name] = str(folder)
    atomic_write_json(index, data)
    return index


def registered_encoders() -> dict[str, str]:
    index = protodiff_home() / "encoders.json"
    try:
        return dict(json.loads(index.read_text()))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise EncoderError(f"{index}: unreadable encoder index ({exc}).") from None


def is_exported_encoder(path: str | os.PathLike) -> bool:
    p = Path(path)
    for cand in (p, p / "outputs" / "encoder"):
        if (cand / WEIGHTS).is_file() and (cand / CONFIG).is_file():
            return True
    return False


def resolve_encoder(spec: str | os.PathLike) -> Path:
    """The encoder folder for ``spec``: an encoder folder, a pretraining run directory, or a registered name."""
    p = Path(spec).expanduser()
    if p.is_dir():
        for cand in (p, p / "outputs" / "encoder"):
            if (cand / CONFIG).is_file() and (cand / WEIGHTS).is_file():
                return cand
        if (p / "run.json").is_file():
            raise EncoderError(f"{p}: this run has not exported an encoder yet (no outputs/encoder); "
                               "finish or resume the pretraining first.")
        raise EncoderError(f"{p}: not an exported encoder nor a pretraining run directory.")
    names = registered_encoders()
    if str(spec) in names:
        return resolve_encoder(names[str(spec)])
    raise EncoderError(f"'{spec}': no such encoder folder, run directory or registered encoder name.")


def read_encoder_config(folder: str | os.PathLike) -> dict[str, Any]:
    folder = Path(folder)
    try:
        cfg = json.loads((folder / CONFIG).read_text())
    except FileNotFoundError:
        raise EncoderError(f"{folder}: no {CONFIG}; not an exported encoder.") from None
    except (OSError, ValueError) as exc:
        raise EncoderError(f"{folder / CONFIG}: unreadable ({exc}).") from None
    if cfg.get("format") != FORMAT:
        raise EncoderError(f"{folder / CONFIG}: not a protodiff encoder config.")
    if not (folder / WEIGHTS).is_file():
        raise EncoderError(f"{folder}: no {WEIGHTS}; the export is incomplete.")
    return cfg


def build_encoder(cfg: dict[str, Any]):
    """The untrained timm model described by an encoder config (no download)."""
    if cfg.get("library") != "timm":
        raise EncoderError(f"encoder library '{cfg.get('library')}' is not supported (timm only).")
    import timm

    return timm.create_model(cfg["architecture"], pretrained=False, **cfg.get("model_args", {}))


def load_encoder(spec: str | os.PathLike, device: str = "cpu"):
    """(model in eval mode, config) of the encoder ``spec`` (see :func:`resolve_encoder`)."""
    from safetensors.torch import load_file

    folder = resolve_encoder(spec)
    cfg = read_encoder_config(folder)
    model = build_encoder(cfg)
    try:
        state = load_file(str(folder / WEIGHTS), device=device)
    except Exception as exc:
        raise EncoderError(f"{folder / WEIGHTS}: cannot read the weights ({exc}).") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise EncoderError(f"{folder / WEIGHTS}: the weights do not fit {cfg['architecture']} "
                           f"(missing {len(missing)}, unexpected {len(unexpected)} tensors).")
    model.to(device).eval()
    cfg["path"] = str(folder)
    return model, cfg


def preprocess(patches, cfg: dict[str, Any]):
    """(N, S, S, 3) uint8 patches -> normalised (N, 3, input_size, input_size) float tensor for the encoder."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    x = torch.as_tensor(np.ascontiguousarray(patches)).permute(0, 3, 1, 2).float().div_(255.0)
    size = int(cfg["input_size"])
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    return (x - mean) / std


def embed_patches(model, cfg: dict[str, Any], patches, batch_size: int = 256):
    """Features (N, embed_dim) float32 numpy array of uint8 patches."""
    import numpy as np
    import torch

    out = []
    with torch.inference_mode():
        for i in range(0, len(patches), batch_size):
            out.append(model(preprocess(patches[i : i + batch_size], cfg)).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, cfg["embed_dim"]), np.float32)
