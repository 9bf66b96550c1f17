"""Configuration of the diffusion stage: presets ``tiny``, ``small`` and ``base`` and a seed.

One pydantic model, :class:`DiffusionConfig`, is shared by the Python API,
``protodiff train-diffusion`` and the napari widget. A preset fills in every field;
any field can then be overridden (``DiffusionConfig.from_preset("tiny", seed=3)``).

* ``tiny``: 32-px patches, an autoencoder that downsamples 4x (8 x 8 x 4 latents), a
  two-level UNet of 32/64 channels. Trains in a few CPU minutes: for trying the method
  and for tests.
* ``small``: 64-px patches, 16 x 16 latents, a three-level UNet (64/128/128) with
  attention at the lowest level: a workstation GPU in an hour or so.
* ``base``: 256-px patches, 8x autoencoder (32 x 32 x 4 latents), a four-level UNet
  (128/256/512/512) with attention: the paper-scale model, for GPUs.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

PRESETS = ("tiny", "small", "base")
SCHEDULERS = ("ddim", "ddpm", "dpm++")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AutoencoderConfig(_Model):
    downsample: Literal[4, 8] = Field(4, description="Spatial downsampling factor of the autoencoder (4 or 8).")
    latent_channels: int = Field(4, ge=1, le=64)
    block_out_channels: tuple[int, ...] = Field((32, 64, 64), description="Encoder/decoder widths, one per level.")
    layers_per_block: int = Field(1, ge=1, le=4)
    mid_attention: bool = Field(False, description="Self-attention in the autoencoder's middle block.")
    kl_weight: float = Field(1e-6, ge=0, description="Weight of the KL term of the VAE loss.")
    steps: int = Field(300, ge=0)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0)

    @model_validator(mode="after")
    def _levels(self) -> "AutoencoderConfig":
        want = {4: 3, 8: 4}[self.downsample]
        if len(self.block_out_channels) != want:
            raise ValueError(f"a {self.downsample}x autoencoder needs {want} block_out_channels, "
                             f"not {len(self.block_out_channels)}")
        return self


class UNetConfig(_Model):
    block_out_channels: tuple[int, ...] = Field((32, 64))
    layers_per_block: int = Field(1, ge=1, le=4)
    attention_levels: tuple[bool, ...] = Field((False, False), description="Self-attention at each level.")
    steps: int = Field(400, ge=0)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(2e-3, gt=0)
    class_conditional: bool = Field(False, description="Also learn classifier-free conditioning on the prototype id.")
    cond_dropout: float = Field(0.2, ge=0, le=1, description="Share of training samples with the 'no prototype' id.")

    @model_validator(mode="after")
    def _levels(self) -> "UNetConfig":
        if len(self.attention_levels) != len(self.block_out_channels):
            raise ValueError("attention_levels needs one entry per block_out_channels entry")
        return self


class ClassifierConfig(_Model):
    channels: tuple[int, ...] = Field((32, 64), description="Widths of the classifier's conv levels.")
    time_embed_dim: int = Field(64, ge=8)
    steps: int = Field(300, ge=0)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(2e-3, gt=0)


class DiffusionConfig(_Model):
    """Everything ``train-diffusion`` needs; ``from_preset`` fills it in."""

    preset: Literal["tiny", "small", "base", "custom"] = "tiny"
    seed: int = Field(0, ge=0)
    image_size: int = Field(32, ge=16, le=1024, description="Side (px) patches are resized to for the model.")
    autoencoder: AutoencoderConfig = Field(default_factory=AutoencoderConfig)
    unet: UNetConfig = Field(default_factory=UNetConfig)
    classifier: ClassifierConfig = Field(default_factory=ClassifierConfig)
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    num_train_timesteps: int = Field(1000, ge=10, le=4000)
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "squaredcos_cap_v2"
    ema_decay: float = Field(0.995, ge=0, lt=1, description="EMA decay of the UNet's weights (0: no EMA).")
    grad_clip: float = Field(1.0, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field(
        "auto", description="'auto': bf16 autocast on a CUDA GPU, full precision on CPU.")
    gradient_checkpointing: Literal["auto", "on", "off"] = Field("auto", description="'auto': on with a GPU.")
    checkpoint_every: int = Field(200, ge=1, description="Save a resumable checkpoint every N steps.")
    device: str = Field("auto", description="'auto', 'cpu', 'cuda' or 'cuda:N'.")
    max_patches: int | None = Field(None, ge=1, description="Train on at most this many patches (random, seeded).")

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v not in ("auto", "cpu") and not v.startswith("cuda") and v != "mps":
            raise ValueError(f"unknown device '{v}' (use auto, cpu, cuda or cuda:N)")
        return v

    @model_validator(mode="after")
    def _size(self) -> "DiffusionConfig":
        if self.image_size % (self.autoencoder.downsample * 2 ** (len(self.unet.block_out_channels) - 1)):
            raise ValueError(f"image_size {self.image_size} must be divisible by the autoencoder's downsampling "
                             f"({self.autoencoder.downsample}) times the UNet's ({2 ** (len(self.unet.block_out_channels) - 1)})")
        return self

    @property
    def latent_size(self) -> int:
        return self.image_size // self.autoencoder.downsample

    @classmethod
    def from_preset(cls, preset: str = "tiny", **overrides) -> "DiffusionConfig":
        if preset not in PRESETS:
            raise ValueError(f"unknown preset '{preset}'; choose one of {', '.join(PRESETS)}")
        base = dict(_PRESETS[preset])
        for key, val in overrides.items():
            if isinstance(val, dict) and isinstance(base.get(key), dict):
                base[key] = {**base[key], **val}
            elif val is not None:
                base[key] = val
        return cls(preset=preset, **base)


_PRESETS: dict[str, dict] = {
    "tiny": dict(
        image_size=32,
        autoencoder=dict(downsample=4, block_out_channels=(16, 32, 32), layers_per_block=1, steps=150, batch_size=16,
                         lr=2e-3),
        unet=dict(block_out_channels=(16, 32), layers_per_block=1, attention_levels=(False, False), steps=900,
                  batch_size=32, lr=3e-3),
        classifier=dict(channels=(16, 32), time_embed_dim=32, steps=200, batch_size=64, lr=3e-3),
        ema_decay=0.99,
        checkpoint_every=200,
    ),
    "small": dict(
        image_size=64,
        autoencoder=dict(downsample=4, block_out_channels=(64, 128, 128), layers_per_block=2, mid_attention=True,
                         steps=20_000,
                         batch_size=64, lr=2e-4),
        unet=dict(block_out_channels=(64, 128, 128), layers_per_block=2, attention_levels=(False, False, True),
                  steps=50_000, batch_size=128, lr=2e-4),
        classifier=dict(channels=(32, 64, 128), time_embed_dim=128, steps=20_000, batch_size=256, lr=3e-4),
        ema_decay=0.999,
        checkpoint_every=2_000,
    ),
    "base": dict(
        image_size=256,
        autoencoder=dict(downsample=8, block_out_channels=(128, 256, 512, 512), layers_per_block=2, mid_attention=True,
                         steps=100_000,
                         batch_size=32, lr=1e-4),
        unet=dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                  attention_levels=(False, True, True, True), steps=200_000, batch_size=128, lr=1e-4),
        classifier=dict(channels=(64, 128, 256, 256), time_embed_dim=256, steps=50_000, batch_size=256, lr=3e-4),
        ema_decay=0.9999,
        checkpoint_every=5_000,
    ),
}


#: Classifier guidance acts at noise levels t / T of at least this by default (docs/diffusion.md).
GUIDANCE_MIN_T = 0.4


class SampleConfig(_Model):
    """Parameters of sampling (shared by the API, ``protodiff sample`` and the Synthesize widget)."""

    n: int = Field(64, ge=1, description="Number of synthetic patches.")
    prototypes: str = Field("balanced", description="'balanced', 'all' (= balanced), one id '3', ids '3,5' (even mix "
                            "over the list, one id per patch) or weights '3:0.7,5:0.3' (a mixture for every patch).")
    guidance: float = Field(3.0, description="Classifier-guidance scale s (0: unguided).")
    guidance_min_t: float = Field(GUIDANCE_MIN_T, ge=0, lt=1, description="Classifier guidance acts only at noise levels t / T "
                                  "of at least this (0: at every step); what prototype a patch becomes is decided at "
                                  "high noise, so the gradients below it cost time and change little.")
    cfg_scale: float | None = Field(None, description="Classifier-free guidance scale (needs a class-conditional UNet).")
    steps: int = Field(50, ge=1, le=1000)
    scheduler: Literal["ddim", "ddpm", "dpm++"] = "ddim"
    seed: int = Field(0, ge=0)
    batch_size: int = Field(64, ge=1)
    device: str = "auto"

    @field_validator("guidance")
    @classmethod
    def _guidance(cls, v: float) -> float:
        if not v >= 0:
            raise ValueError(f"The guidance scale must be 0 or positive, not {v}.")
        if v > 1000:
            raise ValueError(f"The guidance scale {v:g} is absurd; useful values lie between 0 and about 30.")
        return v

    @field_validator("cfg_scale")
    @classmethod
    def _cfg(cls, v: float | None) -> float | None:
        if v is not None and not 0 <= v <= 100:
            raise ValueError(f"The classifier-free guidance scale must lie between 0 and 100, not {v}.")
        return v
