"""The noise-aware prototype classifier: p(prototype | x_t, t) on noisy latents.

A small convolutional network (a few levels of conv + GroupNorm + SiLU, each modulated
by a sinusoidal timestep embedding through a learned scale and shift, then global
average pooling and a linear head). Trained on latents noised at *all* timesteps with
the same schedule as the UNet, so its gradient ``d log p(y | x_t) / d x_t`` is
meaningful along the whole sampling trajectory (Dhariwal & Nichol 2021). It is a
diffusers ``ModelMixin``: ``save_pretrained`` writes safetensors and a config.

Keep it under a tenth of the UNet's FLOPs (:func:`flops` measures both), so guidance
costs little on top of the UNet.
"""

from __future__ import annotations

import math

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, temb: int, down: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride=2 if down else 1, padding=1)
        self.norm = nn.GroupNorm(math.gcd(cout, 8), cout)
        self.film = nn.Linear(temb, 2 * cout)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.conv(x))
        scale, shift = self.film(emb)[:, :, None, None].chunk(2, dim=1)
        return self.act(h * (1 + scale) + shift)


class NoiseAwareClassifier(ModelMixin, ConfigMixin):
    """Logits over ``num_prototypes`` from noisy latents ``x`` (B, C, H, W) and timesteps ``t`` (B,)."""

    config_name = "config.json"

    @register_to_config
    def __init__(self, in_channels: int = 4, sample_size: int = 8, num_prototypes: int = 2,
                 channels: tuple[int, ...] = (32, 64), time_embed_dim: int = 64,
                 num_train_timesteps: int = 1000) -> None:
        super().__init__()
        self.time_mlp = nn.Sequential(nn.Linear(time_embed_dim, time_embed_dim), nn.SiLU(),
                                      nn.Linear(time_embed_dim, time_embed_dim))
        blocks, cin = [], in_channels
        for i, c in enumerate(channels):
            blocks.append(_Block(cin, c, time_embed_dim, down=i > 0))
            cin = c
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Linear(cin, num_prototypes)

    def embed_time(self, t: torch.Tensor) -> torch.Tensor:
        """The timestep embedding (B, E) or (1, E): computed once per sampling step, outside autograd."""
        return self.time_mlp(timestep_embedding(t.reshape(-1), self.config.time_embed_dim))

    def classify(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """Logits from latents and a timestep embedding (broadcast over the batch if it has one row)."""
        h = x
        for b in self.blocks:
            h = b(h, emb.to(x.dtype))
        return self.head(h.mean((2, 3)))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        return self.classify(x, self.embed_time(t))


def build_classifier(cfg, n_prototypes: int) -> NoiseAwareClassifier:
    return NoiseAwareClassifier(in_channels=cfg.autoencoder.latent_channels, sample_size=cfg.latent_size,
                                num_prototypes=int(n_prototypes), channels=tuple(cfg.classifier.channels),
                                time_embed_dim=cfg.classifier.time_embed_dim,
                                num_train_timesteps=cfg.num_train_timesteps)


def classifier_loss(clf, scheduler, z0, labels, generator=None):
    """(loss, metrics): cross-entropy on latents noised at uniformly drawn timesteps."""
    import torch.nn.functional as F

    b = z0.shape[0]
    noise = torch.randn(z0.shape, generator=generator, device=z0.device, dtype=z0.dtype)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=generator, device=z0.device)
    logits = clf(scheduler.add_noise(z0, noise, t), t)
    loss = F.cross_entropy(logits, labels)
    acc = (logits.argmax(1) == labels).float().mean()
    return loss, {"ce": float(loss.detach()), "acc": float(acc)}


def classifier_accuracy(clf, scheduler, z0, labels, timesteps=(0, 250, 500, 750, 999), seed: int = 0) -> dict:
    """Accuracy of the classifier at a few fixed noise levels (held-out latents)."""
    g = torch.Generator(device=z0.device).manual_seed(seed)
    out = {}
    with torch.no_grad():
        for t in timesteps:
            t = min(int(t), scheduler.config.num_train_timesteps - 1)
            tt = torch.full((len(z0),), t, device=z0.device, dtype=torch.long)
            noise = torch.randn(z0.shape, generator=g, device=z0.device)
            pred = clf(scheduler.add_noise(z0, noise, tt), tt).argmax(1)
            out[f"t{t}"] = round(float((pred == labels).float().mean()), 4)
    return out


def flops(model, *inputs) -> int:
    """Forward FLOPs of ``model(*inputs)`` (torch's FLOP counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(*inputs)
    return int(fc.get_total_flops())
