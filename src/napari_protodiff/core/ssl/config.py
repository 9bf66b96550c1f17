"""The pretraining configuration: one pydantic model shared by the API, the CLI and the Jobs widget.

A *preset* (``tiny``, ``small``, ``base``) fills every field the caller leaves out;
explicit values always win. ``tiny`` trains in a few CPU minutes (tests, demo),
``small`` is a useful CPU/GPU run on small data, ``base`` follows the DINO paper's
ViT recipe (224-px global and 96-px local crops, 65,536 prototypes).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

ARCHS: dict[str, str] = {
    # protodiff name -> timm architecture (weights are never downloaded: pretrained=False)
    "vit_tiny": "vit_tiny_patch16_224",
    "vit_small": "vit_small_patch16_224",
    "vit_base": "vit_base_patch16_224",
}

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        patch_size=8, global_size=32, local_size=16, n_local=2, out_dim=1024, hidden_dim=512, bottleneck_dim=128,
        batch_size=32, epochs=3, images_per_epoch=512, lr=2e-3, warmup_epochs=1, warmup_teacher_temp_epochs=1,
        drop_path=0.0, freeze_last_layer=0, momentum_teacher=0.99,
    ),
    "small": dict(
        patch_size=16, global_size=112, local_size=48, n_local=6, out_dim=16384, hidden_dim=2048, bottleneck_dim=256,
        batch_size=64, epochs=50, images_per_epoch=20000, lr=5e-4, warmup_epochs=5, warmup_teacher_temp_epochs=10,
        drop_path=0.1, freeze_last_layer=1, momentum_teacher=0.996,
    ),
    "base": dict(
        patch_size=16, global_size=224, local_size=96, n_local=8, out_dim=65536, hidden_dim=2048, bottleneck_dim=256,
        batch_size=64, epochs=100, images_per_epoch=100000, lr=5e-4, warmup_epochs=10, warmup_teacher_temp_epochs=30,
        drop_path=0.1, freeze_last_layer=1, momentum_teacher=0.996,
    ),
}

# Fields that change how fast a run goes, not what it computes: left out of the run's
# identity (config hash), so a run may be resumed with other values.
RUNTIME_FIELDS = frozenset({"workers", "threads", "device", "checkpoint_every", "log_every"})


class PretrainConfig(BaseModel):
    """Parameters of DINO pretraining (``protodiff pretrain``, the Jobs widget, :func:`..train.pretrain`)."""

    model_config = ConfigDict(extra="forbid")

    real: list[str] = Field(default_factory=list, description="Patch stores of real patches.")
    synthetic: list[str] = Field(default_factory=list, description="Patch stores of synthetic patches.")
    real_fraction: float = Field(1.0, description="Share of real patches in each epoch (0-1); the rest is synthetic.")
    resize: bool = Field(False, description="Resample stores of another pixel size to the first store's µm/px.")
    preset: Literal["tiny", "small", "base"] = Field("tiny", description="Defaults for every field not given.")
    arch: Literal["vit_tiny", "vit_small", "vit_base"] = Field("vit_tiny", description="Vision transformer (timm).")
    patch_size: int = Field(16, ge=2, le=64, description="ViT patch (token) size in pixels.")
    global_size: int = Field(224, ge=8, le=1024, description="Side of the two global crops (px).")
    local_size: int = Field(96, ge=4, le=1024, description="Side of the local crops (px).")
    n_local: int = Field(8, ge=0, le=32, description="Number of local crops per image.")
    global_scale: tuple[float, float] = Field((0.4, 1.0), description="Area range of a global crop.")
    local_scale: tuple[float, float] = Field((0.05, 0.4), description="Area range of a local crop.")
    out_dim: int = Field(65536, ge=16, description="Prototypes of the DINO head (output dimension).")
    hidden_dim: int = Field(2048, ge=16, description="Hidden width of the DINO head.")
    bottleneck_dim: int = Field(256, ge=8, description="Bottleneck width of the DINO head.")
    batch_size: int = Field(64, ge=2, description="Images per step (per process under DDP).")
    epochs: int = Field(100, ge=1, description="Epochs.")
    images_per_epoch: int = Field(100000, ge=2, description="Images drawn per epoch (whatever the stores' sizes).")
    lr: float = Field(5e-4, gt=0, description="Peak learning rate at a total batch of 256 (scaled linearly).")
    min_lr: float = Field(1e-6, ge=0, description="Final learning rate of the cosine schedule.")
    warmup_epochs: int = Field(10, ge=0, description="Linear learning-rate warm-up (epochs).")
    weight_decay: float = Field(0.04, ge=0, description="Initial weight decay (cosine schedule).")
    weight_decay_end: float = Field(0.4, ge=0, description="Final weight decay.")
    momentum_teacher: float = Field(0.996, ge=0, le=1, description="Initial EMA momentum of the teacher (cosine to 1).")
    teacher_temp: float = Field(0.04, gt=0, description="Teacher temperature after warm-up.")
    warmup_teacher_temp: float = Field(0.04, gt=0, description="Teacher temperature at the start.")
    warmup_teacher_temp_epochs: int = Field(30, ge=0, description="Teacher temperature warm-up (epochs).")
    student_temp: float = Field(0.1, gt=0, description="Student temperature.")
    center_momentum: float = Field(0.9, ge=0, le=1, description="Momentum of the teacher output's centre.")
    clip_grad: float = Field(3.0, ge=0, description="Gradient clipping (max norm per parameter tensor; 0: off).")
    freeze_last_layer: int = Field(1, ge=0, description="Epochs during which the head's last layer is frozen.")
    norm_last_layer: bool = Field(True, description="Weight-normalise the head's last layer.")
    drop_path: float = Field(0.1, ge=0, lt=1, description="Stochastic depth rate of the student.")
    stain_jitter: float = Field(0.03, ge=0, le=0.5, description="HED stain jitter strength (0: off).")
    color_jitter: float = Field(0.2, ge=0, le=1, description="Brightness/contrast jitter strength (saturation, hue scaled down).")
    seed: int = Field(0, description="Seed of weights, sampling and augmentations.")
    workers: int = Field(2, ge=0, le=64, description="Data-loading worker processes (0: in the training process).")
    threads: int | None = Field(None, ge=1, description="Torch threads of the training process (default: torch's).")
    device: str = Field("auto", description="'auto', 'cpu', 'cuda' or 'cuda:N'.")
    checkpoint_every: int = Field(50, ge=1, description="Steps between checkpoints (and at every epoch end).")
    log_every: int = Field(1, ge=1, description="Steps between metrics records.")

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if isinstance(data, dict):
            preset = data.get("preset") or "tiny"
            if preset in PRESETS:
                data = dict(data)
                for k, v in PRESETS[preset].items():
                    if data.get(k) is None:
                        data[k] = v
                data = {k: v for k, v in data.items() if v is not None or k == "threads"}
        return data

    @field_validator("real", "synthetic")
    @classmethod
    def _absolute(cls, v: list[str]) -> list[str]:
        return [str(Path(p).expanduser().resolve()) for p in v]

    @field_validator("real_fraction")
    @classmethod
    def _fraction(cls, v: float) -> float:
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"The real fraction must be between 0 and 1 (got {v:g}).")
        return v

    @field_validator("global_scale", "local_scale")
    @classmethod
    def _scale(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1] <= 1:
            raise ValueError(f"The crop area range must satisfy 0 < min <= max <= 1 (got {v[0]:g}, {v[1]:g}).")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "PretrainConfig":
        if not self.real and not self.synthetic:
            raise ValueError("The pretraining needs at least one patch store (--real or --synthetic).")
        if self.real_fraction > 0 and not self.real:
            raise ValueError(f"The real fraction is {self.real_fraction:g} but no real store is given (--real).")
        if self.real_fraction < 1 and not self.synthetic:
            raise ValueError(f"The real fraction is {self.real_fraction:g} but no synthetic store is given (--synthetic).")
        for name in ("global_size", "local_size"):
            if getattr(self, name) % self.patch_size:
                raise ValueError(f"The {name.replace('_', ' ')} ({getattr(self, name)} px) must be a multiple of the "
                                 f"ViT patch size ({self.patch_size} px).")
        return self

    @property
    def timm_name(self) -> str:
        return ARCHS[self.arch]

    @property
    def n_views(self) -> int:
        return 2 + self.n_local

    def identity(self) -> dict[str, Any]:
        """The part of the configuration that determines the results (hashed into the run's identity)."""
        return self.model_dump(mode="json", exclude=set(RUNTIME_FIELDS))
