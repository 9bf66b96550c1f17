"""Any timm architecture with weights from a local file (no hub, no download).

Weights are read from ``.safetensors`` (preferred) or a torch file loaded with
``torch.load(weights_only=True)`` (never unpickling arbitrary objects). Common
checkpoint wrappers are unwrapped (``state_dict``, ``model``, ``teacher`` for DINO) and a
common prefix (``module.``, ``backbone.``, ``model.``, ``encoder.``) is stripped;
classifier/projection heads are dropped (the encoder is the backbone, ``num_classes=0``).
Every other key must match the architecture exactly, in name and shape; the first
mismatch is reported with the file's name.

An *exported encoder* (``model.safetensors`` + ``config.json``, written by
:func:`napari_protodiff.core.ssl.export.export_encoder` after DINO pretraining)
carries its architecture, timm options, input size, pixel size and normalisation, so
the project's own encoders load with ``--encoder FOLDER``, ``--encoder RUN_DIR`` or the
name they were registered under.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from .registry import IMAGENET_MEAN, IMAGENET_STD, WEIGHT_SUFFIXES, Encoder, EncoderError, register_encoder, resolve_device

WRAPPERS = ("teacher", "state_dict", "model", "module", "net", "backbone")
PREFIXES = ("module.", "backbone.", "model.", "encoder.", "trunk.")
HEAD_PREFIXES = ("head.", "fc.", "classifier.", "head_dist.", "heads.")


def file_sha256(path: str | Path, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def read_state_dict(path: str | Path) -> dict[str, Any]:
    """Tensors of a weights file (safetensors or a plain torch tensor file), unwrapped."""
    import torch

    p = Path(path)
    if not p.is_file():
        raise EncoderError(f"{p}: no such weights file.")
    suffix = p.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            sd: Any = load_file(str(p), device="cpu")
        else:
            sd = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception:
        if suffix == ".safetensors":
            raise EncoderError(f"{p}: cannot be read as a safetensors weights file (damaged or another format).") from None
        raise EncoderError(f"{p}: cannot be read as a torch weights file with weights_only=True "
                           "(damaged, or it holds pickled objects other than tensors).") from None
    for _ in range(3):
        if isinstance(sd, dict) and not any(isinstance(v, torch.Tensor) for v in sd.values()):
            inner = next((sd[k] for k in WRAPPERS if isinstance(sd.get(k), dict)), None)
            if inner is None:
                break
            sd = inner
    if not isinstance(sd, dict) or not sd:
        raise EncoderError(f"{p}: holds no tensors (not a model state dict).")
    tensors = {str(k): v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise EncoderError(f"{p}: holds no tensors (not a model state dict).")
    for pre in PREFIXES:
        body = [k for k in tensors if not k.startswith(HEAD_PREFIXES)]
        if body and all(k.startswith(pre) for k in body):
            tensors = {k[len(pre):] if k.startswith(pre) else k: v for k, v in tensors.items()}
    return tensors


def check_and_load(model, state: dict[str, Any], path: str | Path) -> list[str]:
    """Load ``state`` into ``model`` strictly (heads aside); returns the dropped head keys."""
    own = model.state_dict()
    dropped = sorted(k for k in state if k not in own and k.startswith(HEAD_PREFIXES))
    state = {k: v for k, v in state.items() if k not in dropped}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing:
        raise EncoderError(f"{path}: does not fit the architecture: it lacks '{missing[0]}' "
                           f"({len(missing)} of the model's {len(own)} tensors are missing).")
    if unexpected:
        raise EncoderError(f"{path}: does not fit the architecture: it has '{unexpected[0]}', which the model lacks "
                           f"({len(unexpected)} unexpected tensors).")
    for k, v in own.items():
        if tuple(state[k].shape) != tuple(v.shape):
            hint = "; give the input size the weights were trained at (--input-size)" if k == "pos_embed" else ""
            raise EncoderError(f"{path}: does not fit the architecture: '{k}' has shape {tuple(state[k].shape)} "
                               f"in the file but {tuple(v.shape)} in the model{hint}.")
    model.load_state_dict(state, strict=True)
    return dropped


class TimmEncoder(Encoder):
    """A timm backbone (``num_classes=0``) with local weights."""

    model: Any = None

    @classmethod
    def from_weights(
        cls,
        weights: str | Path,
        arch: str | None,
        *,
        name: str | None = None,
        input_size: int | None = None,
        mpp: float | None = None,
        mean=None,
        std=None,
        timm_kwargs: dict[str, Any] | None = None,
        key_format: str = "timm",
        device: str | None = "auto",
    ) -> "TimmEncoder":
        import timm
        import torch

        wpath = Path(weights).expanduser().resolve()
        if not arch:
            raise EncoderError(f"{wpath}: name its timm architecture (--arch, e.g. vit_small_patch16_224).")
        if not timm.is_model(arch):
            raise EncoderError(f"Unknown timm architecture '{arch}' (see timm.list_models()).")
        kw = dict(timm_kwargs or {})
        if input_size and "img_size" not in kw and _takes_img_size(arch):
            kw["img_size"] = int(input_size)
        try:
            model = timm.create_model(arch, pretrained=False, num_classes=0, **kw)
        except Exception as exc:
            raise EncoderError(f"Cannot build timm architecture '{arch}' with {kw} ({exc}).") from None
        state = read_state_dict(wpath)
        if key_format == "hf-vit":
            state = hf_vit_to_timm(state)
        dropped = check_and_load(model, state, wpath)
        dev = resolve_device(device)
        model.eval().to(dev)
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        size = int(input_size or _model_img_size(model) or cfg.get("input_size", (3, 224, 224))[-1])
        with torch.inference_mode():
            dim = int(model(torch.zeros(1, 3, size, size, device=dev)).shape[-1])
        enc = cls(name=name or arch, kind="timm", dim=dim, input_size=size, mpp=mpp,
                  mean=tuple(mean or cfg.get("mean") or IMAGENET_MEAN), std=tuple(std or cfg.get("std") or IMAGENET_STD),
                  arch=arch, weights=str(wpath), weights_sha256=file_sha256(wpath), device=dev,
                  extra={"timm_kwargs": kw, "key_format": key_format, "dropped_keys": dropped[:20]})
        enc.model = model
        return enc

    def encode(self, batch: np.ndarray) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        b = self.check_batch(batch)
        if b.shape[0] == 0:
            return np.zeros((0, self.dim), np.float32)
        dev = torch.device(self.device)
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(b)).to(dev).permute(0, 3, 1, 2).float().div_(255.0)
            if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
                x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear",
                                  antialias=x.shape[-1] > self.input_size, align_corners=False)
            mean = torch.tensor(self.mean, device=dev).view(1, 3, 1, 1)
            std = torch.tensor(self.std, device=dev).view(1, 3, 1, 1)
            out = self.model((x - mean) / std)
        return out.float().cpu().numpy().astype(np.float32, copy=False)


def _takes_img_size(arch: str) -> bool:
    return any(s in arch for s in ("vit", "deit", "eva", "beit", "swin", "cait", "xcit"))


def _model_img_size(model) -> int | None:
    pe = getattr(model, "patch_embed", None)
    size = getattr(pe, "img_size", None)
    if isinstance(size, (tuple, list)) and size:
        return int(size[0])
    return int(size) if isinstance(size, int) else None


# -- exported encoders (the project's own DINO encoders) and sidecar configs ------------------
def from_path(path: Path, arch: str | None = None, device: str | None = "auto", **options: Any) -> TimmEncoder:
    """An exported encoder folder (or its run directory), its ``config.json``, or a weights file
    (with ``arch``, or a ``FILE.json`` beside it in the exported-encoder config format)."""
    from ..ssl import export

    if path.is_dir():
        folder = export.resolve_encoder(path)
        return _from_config(export.read_encoder_config(folder), folder / export.WEIGHTS, arch, device, **options)
    if path.suffix.lower() == ".json":
        return _from_config(_read_json(path), path.parent / export.WEIGHTS, arch, device, **options)
    if path.suffix.lower() not in WEIGHT_SUFFIXES:
        raise EncoderError(f"{path}: not a weights file ({', '.join(WEIGHT_SUFFIXES)}), an encoder config (.json) "
                           "nor an encoder folder.")
    side = path.with_name(path.name + ".json")
    if arch is None and side.is_file():
        return _from_config(_read_json(side), path, None, device, **options)
    return TimmEncoder.from_weights(path, arch, device=device, **options)


def from_registered_name(name: str, device: str | None = "auto", **options: Any) -> TimmEncoder | None:
    """An encoder registered by name at export (``protodiff pretrain ... --name``), or ``None``."""
    from ..ssl import export

    folder = export.registered_encoders().get(name)
    if folder is None:
        return None
    folder = export.resolve_encoder(folder)
    options.setdefault("name", name)
    return _from_config(export.read_encoder_config(folder), folder / export.WEIGHTS, None, device, **options)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError) as exc:
        raise EncoderError(f"{path}: not a readable encoder config ({exc}).") from None


def _from_config(cfg: dict[str, Any], weights: Path, arch: str | None, device: str | None, **options: Any) -> TimmEncoder:
    """Build from the exported-encoder config keys (architecture, model_args, input_size, mean, std, patch_mpp)."""
    if cfg.get("library", "timm") != "timm":
        raise EncoderError(f"{weights.parent}: encoder library '{cfg.get('library')}' is not supported (timm only).")
    margs = {k: v for k, v in (cfg.get("model_args") or cfg.get("timm_kwargs") or {}).items() if k != "num_classes"}
    kw: dict[str, Any] = {"name": cfg.get("name") or f"{cfg.get('arch') or cfg.get('architecture')}-{weights.parent.name}",
                          "input_size": cfg.get("input_size"), "mpp": cfg.get("patch_mpp", cfg.get("mpp")),
                          "mean": cfg.get("mean"), "std": cfg.get("std"), "timm_kwargs": margs,
                          "key_format": cfg.get("key_format", "timm")}
    kw.update(options)
    return TimmEncoder.from_weights(Path(cfg["weights"]) if cfg.get("weights") else weights,
                                    arch or cfg.get("architecture") or cfg.get("arch"), device=device, **kw)


# -- Hugging Face ViT checkpoints (e.g. Phikon) -> timm names --------------------------------
def hf_vit_to_timm(state: dict[str, Any]) -> dict[str, Any]:
    """Rename a transformers ``ViTModel`` state dict to timm's VisionTransformer names."""
    import torch

    s = {k[len("vit."):] if k.startswith("vit.") else k: v for k, v in state.items()}
    if "embeddings.cls_token" not in s:
        return state
    out = {"cls_token": s["embeddings.cls_token"], "pos_embed": s["embeddings.position_embeddings"],
           "patch_embed.proj.weight": s["embeddings.patch_embeddings.projection.weight"],
           "patch_embed.proj.bias": s["embeddings.patch_embeddings.projection.bias"],
           "norm.weight": s["layernorm.weight"], "norm.bias": s["layernorm.bias"]}
    i = 0
    while f"encoder.layer.{i}.attention.attention.query.weight" in s:
        p, q = f"encoder.layer.{i}.", f"blocks.{i}."
        for t in ("weight", "bias"):
            out[q + f"attn.qkv.{t}"] = torch.cat([s[p + f"attention.attention.{n}.{t}"] for n in ("query", "key", "value")])
            out[q + f"attn.proj.{t}"] = s[p + f"attention.output.dense.{t}"]
            out[q + f"norm1.{t}"] = s[p + f"layernorm_before.{t}"]
            out[q + f"norm2.{t}"] = s[p + f"layernorm_after.{t}"]
            out[q + f"mlp.fc1.{t}"] = s[p + f"intermediate.dense.{t}"]
            out[q + f"mlp.fc2.{t}"] = s[p + f"output.dense.{t}"]
        i += 1
    return out


# -- public pathology encoders (weights supplied by the user) -------------------------------
PRESETS: dict[str, dict[str, Any]] = {
    "uni": {"arch": "vit_large_patch16_224", "input_size": 224, "mpp": 0.5,
            "timm_kwargs": {"img_size": 224, "init_values": 1e-5, "dynamic_img_size": True},
            "description": "UNI (MahmoodLab) ViT-L/16: pytorch_model.bin from its model page."},
    "phikon": {"arch": "vit_base_patch16_224", "input_size": 224, "mpp": 0.5, "key_format": "hf-vit",
               "timm_kwargs": {"img_size": 224}, "description": "Phikon (Owkin) ViT-B/16: its transformers weights file."},
    "vit-small": {"arch": "vit_small_patch16_224", "input_size": 224, "mpp": 0.5, "timm_kwargs": {"img_size": 224},
                  "description": "Any ViT-S/16 weights (e.g. a DINO ViT-S/16 trained on pathology)."},
}


def _preset_factory(name: str):
    def factory(weights, device=None, arch=None, **options):
        p = {k: v for k, v in PRESETS[name].items() if k != "description"}
        a = arch or p.pop("arch")
        p.pop("arch", None)
        p.update(options)
        return TimmEncoder.from_weights(weights, a, name=name, device=device, **p)

    return factory


for _n, _p in PRESETS.items():
    register_encoder(_n, _preset_factory(_n), _p["description"], needs_weights=True)
