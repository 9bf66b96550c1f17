"""The latent diffusion UNet (diffusers ``UNet2DModel``) and its noise objective.

Standard DDPM training: pick ``t`` uniformly, noise the latents with the scheduler's
``add_noise`` and regress the noise (``epsilon``) or the velocity (``v_prediction``).
With ``class_conditional`` the UNet also gets a prototype id (``num_class_embeds = K + 1``,
the last id meaning "no prototype", used for ``cond_dropout`` of the batch) for
classifier-free guidance, the alternative to compare against.
"""

from __future__ import annotations

import math

from .config import DiffusionConfig


def build_unet(cfg: DiffusionConfig, n_prototypes: int | None = None):
    from diffusers import UNet2DModel

    u = cfg.unet
    down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in u.attention_levels)
    up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(u.attention_levels))
    groups = math.gcd(*u.block_out_channels, 32)
    kw = {}
    if u.class_conditional:
        if not n_prototypes:
            raise ValueError("a class-conditional UNet needs the number of prototypes")
        kw["num_class_embeds"] = n_prototypes + 1
    return UNet2DModel(
        sample_size=cfg.latent_size,
        in_channels=cfg.autoencoder.latent_channels,
        out_channels=cfg.autoencoder.latent_channels,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=tuple(u.block_out_channels),
        layers_per_block=u.layers_per_block,
        norm_num_groups=groups,
        attention_head_dim=8,
        add_attention=any(u.attention_levels),
        **kw,
    )


def build_scheduler(cfg: DiffusionConfig, name: str = "ddpm"):
    """The training (DDPM) noise schedule, or the same schedule as another sampler."""
    from diffusers import DDPMScheduler

    base = DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule,
                         prediction_type=cfg.prediction_type, clip_sample=False)
    return scheduler_from(base.config, name) if name != "ddpm" else base


def scheduler_from(config, name: str):
    """A sampler (``ddim``, ``ddpm`` or ``dpm++``) on the noise schedule of ``config``."""
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    if name == "ddim":
        return DDIMScheduler.from_config(config, clip_sample=False, set_alpha_to_one=False)
    if name == "ddpm":
        return DDPMScheduler.from_config(config, clip_sample=False)
    if name in ("dpm++", "dpmsolver++", "dpm"):
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2)
    raise ValueError(f"unknown scheduler '{name}'")


def diffusion_loss(unet, scheduler, z0, generator=None, class_labels=None):
    """(loss, metrics) of the noise objective on clean latents ``z0``."""
    import torch
    import torch.nn.functional as F

    b = z0.shape[0]
    noise = torch.randn(z0.shape, generator=generator, device=z0.device, dtype=z0.dtype)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=generator, device=z0.device)
    zt = scheduler.add_noise(z0, noise, t)
    target = noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(z0, noise, t)
    pred = unet(zt, t, class_labels=class_labels).sample
    loss = F.mse_loss(pred.float(), target.float())
    return loss, {"mse": float(loss.detach())}
