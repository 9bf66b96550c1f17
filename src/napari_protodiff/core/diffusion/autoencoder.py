"""The autoencoder: a diffusers ``AutoencoderKL`` trained on the patch store.

It maps a patch (``image_size`` px, RGB in [-1, 1]) to ``latent_channels`` x
``image_size / downsample``² latents. The loss is L1 + MSE reconstruction plus a small
KL term; after training, ``scaling_factor`` is set to 1 / std of the latents (as for
Stable Diffusion) so the diffusion model sees latents of unit variance. Reconstruction
quality (PSNR, MSE on [0, 1] pixels) is measured on held-out patches.
"""

from __future__ import annotations

import math
from typing import Any

from .config import AutoencoderConfig


def build_autoencoder(cfg: AutoencoderConfig, image_size: int):
    from diffusers import AutoencoderKL

    n = len(cfg.block_out_channels)
    groups = math.gcd(*cfg.block_out_channels, 32)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels,
        norm_num_groups=groups,
        sample_size=image_size,
        scaling_factor=1.0,
        mid_block_add_attention=cfg.mid_attention,
    )


def autoencoder_loss(vae, x, kl_weight: float):
    """(loss, metrics) of one batch ``x`` in [-1, 1]."""
    import torch.nn.functional as F

    post = vae.encode(x).latent_dist
    z = post.sample()
    rec = vae.decode(z).sample
    l1 = F.l1_loss(rec, x)
    mse = F.mse_loss(rec, x)
    kl = post.kl().mean() / x[0].numel()
    loss = l1 + mse + kl_weight * kl * x[0].numel()
    return loss, {"l1": float(l1.detach()), "mse": float(mse.detach())}


def encode_latents(vae, x, batch: int = 256):
    """Deterministic latents (posterior means, scaled) of images ``x`` in [-1, 1]."""
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            out.append(vae.encode(x[i:i + batch]).latent_dist.mode() * vae.config.scaling_factor)
    return torch.cat(out)


def decode_latents(vae, z):
    """Images in [0, 1] (float tensor) from scaled latents."""
    rec = vae.decode(z / vae.config.scaling_factor).sample
    return (rec / 2 + 0.5).clamp(0, 1)


def set_scaling_factor(vae, x) -> float:
    """Set ``scaling_factor`` to 1 / std of the latent means of ``x``; returns it."""
    import torch

    with torch.no_grad():
        z = torch.cat([vae.encode(x[i:i + 256]).latent_dist.mode() for i in range(0, len(x), 256)])
    sf = float(1.0 / z.flatten().std().clamp(min=1e-6))
    vae.register_to_config(scaling_factor=sf)
    return sf


def reconstruction_quality(vae, x) -> dict[str, Any]:
    """PSNR (dB) and MSE of ``x`` (in [-1, 1]) after encode + decode, in [0, 1] pixel units."""
    import torch

    with torch.no_grad():
        rec = torch.cat([decode_latents(vae, encode_latents(vae, x[i:i + 128])) for i in range(0, len(x), 128)])
    ref = (x / 2 + 0.5).clamp(0, 1)
    mse = ((rec - ref) ** 2).flatten(1).mean(1)
    psnr = (10 * torch.log10(1.0 / mse.clamp(min=1e-10))).mean()
    return {"psnr_db": round(float(psnr), 2), "mse": float(mse.mean()), "n": int(len(x))}
