"""One interface for every patch encoder, and a registry that finds them by name or path.

An :class:`Encoder` turns a batch of RGB patches ``(N, H, W, 3) uint8`` into
``(N, D) float32`` embeddings and describes itself: the input size and pixel size
(µm/px) it expects, its normalisation, its output dimension and an *identity* (name,
architecture, weights file hash) that is stored next to everything computed with it,
so later stages can check they use the same encoder.

:func:`load_encoder` resolves what a user typed (``--encoder``):

* nothing, ``builtin`` or ``stain-texture``: the built-in stain/texture encoder (no weights);
* a registered name (``uni``, ``phikon``, or one added with :func:`register_encoder`)
  together with ``weights=FILE``;
* the project's own DINO encoders: an exported encoder folder (``model.safetensors`` +
  ``config.json``), its pretraining run directory, or the name it was registered under;
* a weights file (``.safetensors``, or ``.pt``/``.pth``/``.bin`` loaded with
  ``weights_only=True``) with ``arch=`` naming a timm architecture (or a ``FILE.json``
  beside it in the exported-encoder config format);
* ``timm:ARCH`` with ``weights=FILE``.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import ProtodiffError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


class EncoderError(ProtodiffError):
    """An encoder cannot be found, loaded, or does not fit its weights."""


@dataclass
class Encoder(ABC):
    """A patch encoder: ``encode(uint8 NHWC) -> float32 (N, D)`` plus what it expects."""

    name: str
    kind: str
    """``builtin``, ``timm`` (any timm architecture with local weights)."""
    dim: int
    input_size: int | None = None
    """Side in pixels the model sees (patches are resized to it); ``None``: any size."""
    mpp: float | None = None
    """Pixel size (µm/px) the encoder was trained at; ``None``: not tied to one."""
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    """Normalisation applied to RGB in [0, 1] before the model; ``None``: none."""
    arch: str | None = None
    weights: str | None = None
    weights_sha256: str | None = None
    device: str = "cpu"
    extra: dict[str, Any] = field(default_factory=dict)

    @abstractmethod
    def encode(self, batch: np.ndarray) -> np.ndarray:
        """Embed a batch ``(N, H, W, 3) uint8`` -> ``(N, dim) float32``."""

    def identity(self) -> dict[str, Any]:
        """What identifies the embeddings this encoder makes (stored with them)."""
        return {
            "name": self.name, "kind": self.kind, "arch": self.arch, "dim": int(self.dim),
            "input_size": self.input_size, "mpp": self.mpp,
            "mean": list(self.mean) if self.mean else None, "std": list(self.std) if self.std else None,
            "weights": self.weights, "weights_sha256": self.weights_sha256, "extra": dict(self.extra),
        }

    @property
    def key(self) -> str:
        """A store-safe name for this encoder's embeddings (name + weights hash prefix)."""
        return encoder_key(self.identity())

    def check_batch(self, batch: np.ndarray) -> np.ndarray:
        b = np.asarray(batch)
        if b.ndim != 4 or b.shape[-1] != 3 or b.dtype != np.uint8:
            raise EncoderError(f"Encoder '{self.name}' takes (N, H, W, 3) uint8 patches, not {b.dtype} {b.shape}.")
        return b


def encoder_key(identity: dict[str, Any]) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", str(identity.get("name") or "encoder")).strip("._") or "encoder"
    sha = identity.get("weights_sha256")
    return f"{base}-{sha[:12]}" if sha else base


def same_encoder(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two identities describe the same encoder (name, kind, arch, weights, size, dim)."""
    keys = ("name", "kind", "arch", "dim", "input_size", "weights_sha256")
    return all(a.get(k) == b.get(k) for k in keys) and (a.get("extra") or {}).get("version") == (b.get("extra") or {}).get("version")


# -- devices ---------------------------------------------------------------------------
def resolve_device(device: str | None = "auto") -> str:
    """``auto`` -> cuda, then mps, then cpu; an explicit device must be available."""
    import torch

    d = (device or "auto").lower()
    if d == "auto":
        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return "mps"
        return "cpu"
    if d.startswith("cuda") and not torch.cuda.is_available():
        raise EncoderError(f"Device '{device}' was asked for but CUDA is not available here; use --device cpu or auto.")
    if d == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise EncoderError("Device 'mps' was asked for but Apple MPS is not available here; use --device cpu or auto.")
    if not (d == "cpu" or d == "mps" or re.fullmatch(r"cuda(:\d+)?", d)):
        raise EncoderError(f"Unknown device '{device}'; use auto, cpu, cuda, cuda:N or mps.")
    return d


# -- the registry ----------------------------------------------------------------------
Factory = Callable[..., Encoder]


@dataclass
class _Entry:
    factory: Factory
    description: str
    needs_weights: bool


_REGISTRY: dict[str, _Entry] = {}


def register_encoder(name: str, factory: Factory, description: str = "", needs_weights: bool = True) -> None:
    """Make ``load_encoder(name, weights=..., device=...)`` call ``factory(weights=..., device=..., **options)``."""
    _REGISTRY[name.lower()] = _Entry(factory, description, needs_weights)


def available_encoders() -> list[dict[str, Any]]:
    _ensure_builtins()
    return [{"name": n, "description": e.description, "needs_weights": e.needs_weights} for n, e in sorted(_REGISTRY.items())]


def _ensure_builtins() -> None:
    if "builtin" in _REGISTRY:
        return
    from . import builtin, timm_encoder  # noqa: F401  (they register themselves)


def load_encoder(
    name_or_path: str | Path | None = None,
    *,
    arch: str | None = None,
    weights: str | Path | None = None,
    device: str | None = "auto",
    **options: Any,
) -> Encoder:
    """Find and build an encoder (see the module docstring for what ``name_or_path`` may be)."""
    _ensure_builtins()
    from . import timm_encoder

    if name_or_path is None or str(name_or_path).strip() == "":
        name_or_path = "builtin"
    text = str(name_or_path)
    entry = _REGISTRY.get(text.lower())
    if entry is not None:
        if entry.needs_weights and weights is None:
            raise EncoderError(f"Encoder '{text}' needs its weights: pass --weights FILE (a local .safetensors or .pt file).")
        kw = dict(options)
        if entry.needs_weights:
            kw["weights"] = weights
        if arch is not None:
            kw["arch"] = arch
        return entry.factory(device=device, **kw)
    if text.lower().startswith("timm:"):
        if weights is None:
            raise EncoderError(f"Encoder '{text}' needs its weights: pass --weights FILE.")
        return timm_encoder.TimmEncoder.from_weights(weights, arch=text[5:], device=device, **options)
    path = Path(text).expanduser()
    if not path.exists():
        named = timm_encoder.from_registered_name(text, device=device, **options)
        if named is not None:
            return named
    if path.exists():
        return timm_encoder.from_path(path, arch=arch, device=device, **options)
    if path.suffix.lower() in WEIGHT_SUFFIXES + (".json",) or "/" in text:
        raise EncoderError(f"{path}: no such encoder file or folder.")
    names = ", ".join(sorted(_REGISTRY))
    raise EncoderError(f"Unknown encoder '{text}': neither a registered name ({names}) nor an existing file.")


def encoder_from_identity(identity: dict[str, Any], device: str | None = "auto") -> Encoder:
    """Rebuild the encoder described by a stored identity (its weights file must still exist and match)."""
    if identity.get("kind") == "builtin":
        enc = load_encoder(identity.get("name") or "builtin", device=device)
    else:
        w = identity.get("weights")
        if not w or not Path(w).exists():
            raise EncoderError(f"The encoder '{identity.get('name')}' used for these embeddings needs its weights file "
                               f"{w or '(unknown)'}, which is not there; pass the encoder explicitly.")
        from . import timm_encoder

        enc = timm_encoder.TimmEncoder.from_weights(
            w, arch=identity.get("arch"), name=identity.get("name"), input_size=identity.get("input_size"),
            mpp=identity.get("mpp"), mean=identity.get("mean"), std=identity.get("std"),
            timm_kwargs=(identity.get("extra") or {}).get("timm_kwargs"),
            key_format=(identity.get("extra") or {}).get("key_format", "timm"), device=device)
    if not same_encoder(enc.identity(), identity):
        raise EncoderError(f"The encoder rebuilt for '{identity.get('name')}' does not match the stored one "
                           "(its weights or version changed).")
    return enc
