"""``PrototypeGuidedPipeline``: latent diffusion steered toward histological prototypes.

A diffusers ``DiffusionPipeline`` of four parts: ``vae`` (AutoencoderKL), ``unet``
(UNet2DModel), ``classifier`` (the noise-aware prototype classifier) and ``scheduler``
(DDIM, DDPM or DPM-Solver++ on the training noise schedule). At each step, with
classifier guidance scale ``s`` and target weights ``w`` over prototypes::

    eps_hat = eps - s * sqrt(1 - alphabar_t) * grad_x log sum_y w_y p(y | x_t)

(one prototype: ``w`` one-hot, i.e. ``grad log p(y | x_t)``; a mixture: any weights).
Guided steps then keep the clean latent they predict, ``x0_hat = (x_t - sqrt(1 - alphabar_t)
eps_hat) / sqrt(alphabar_t)``, within ``[-c, c]`` (``guidance_x0_clip``, default 3: the latents
are scaled to unit variance, so 3 standard deviations, beyond nearly all real latents) and
step with the ``eps_hat`` of the clipped ``x0_hat``: at high noise the classifier term
otherwise shifts ``x0_hat`` by about ``s`` times the distance between prototypes, far out of
the latent range, where the decoder makes artefacts that look like another prototype
(docs/diffusion.md, "Robustness across training seeds"). ``guidance_x0_clip=None`` is the
formula alone. Guidance acts only at noise levels ``t / T >= guidance_min_t`` (default 0.4):
which prototype a patch becomes is settled at high noise, and the gradients below that level
change the hit rate by at most one patch in 64 at training seeds 0-5 of the tiny preset while
costing a fifth of a UNet step each (docs/diffusion.md, benchmarks.md); ``0`` guides every
step. The gradient is ``torch.autograd.grad`` of the classifier's ``log_softmax`` with respect
to the latents; the UNet itself runs without autograd. ``guidance_scale=0`` is plain
unguided sampling, the same loop as diffusers' ``DDIMPipeline``. A UNet trained with
prototype ids (``num_class_embeds``) also allows classifier-free guidance
(``cfg_scale``). ``callback_on_step_end(pipe, step, t, {"latents": ...})`` is called after
every step (progress, cancel: raise from it, or set ``pipe.interrupt = True``).

Saving and loading the whole bundle (with prototype centroids and the encoder's
identity) is in :mod:`.bundle`; ``PrototypeGuidedPipeline.from_pretrained`` and
``save_pretrained`` forward there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from .config import GUIDANCE_MIN_T
from .errors import PrototypeError, SamplingError


@dataclass
class PrototypeSampleOutput(BaseOutput):
    images: Any
    """(N, H, W, 3) float in [0, 1] (``np``), a tensor (``pt``), latents (``latent``) or PIL images."""
    prototypes: np.ndarray
    """(N,) requested prototype of each image (-1 for a mixture or no target)."""


def target_weights(prototypes: Any, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-image target weights (n, k) and requested ids (n,) from a prototype request.

    ``None``: no target (-1); an int: that prototype; a list of ints: one per image or,
    if shorter than ``n``, cycled (so ``range(k)`` is a balanced draw); ``"balanced"``/
    ``"all"``: a balanced draw over all prototypes; a dict ``{id: weight}``: the same
    mixture for every image.
    """
    w = np.zeros((n, k), np.float32)
    if prototypes is None:
        return w + 1.0 / k, np.full(n, -1, np.int64)
    if isinstance(prototypes, str):
        if prototypes in ("balanced", "all"):
            prototypes = list(range(k))
        else:
            raise PrototypeError(f"Unknown prototype request '{prototypes}'; use 'balanced', 'all', ids or weights.")
    if isinstance(prototypes, dict):
        for pid, weight in prototypes.items():
            _check_id(pid, k)
            if not weight >= 0:
                raise PrototypeError(f"The weight of prototype {pid} must be 0 or positive, not {weight}.")
            w[:, int(pid)] = float(weight)
        if w[0].sum() <= 0:
            raise PrototypeError("The prototype mixture's weights sum to zero.")
        return w / w.sum(1, keepdims=True), np.full(n, -1, np.int64)
    ids = [prototypes] if isinstance(prototypes, (int, np.integer)) else list(prototypes)
    if not ids:
        raise PrototypeError("No prototype given.")
    for pid in ids:
        _check_id(pid, k)
    req = np.array([int(ids[i % len(ids)]) for i in range(n)], np.int64)
    w[np.arange(n), req] = 1.0
    return w, req


def _check_id(pid: Any, k: int) -> None:
    if isinstance(pid, bool) or not isinstance(pid, (int, np.integer)) or not 0 <= int(pid) < k:
        raise PrototypeError(f"Prototype {pid} does not exist; this model knows prototypes 0 to {k - 1}.")


class PrototypeGuidedPipeline(DiffusionPipeline):
    """Prototype-guided latent diffusion (see the module docstring)."""

    model_cpu_offload_seq = "unet->vae"
    _callback_tensor_inputs = ["latents"]

    def __init__(self, vae, unet, scheduler, classifier=None) -> None:
        super().__init__()
        self.register_modules(vae=vae, unet=unet, scheduler=scheduler, classifier=classifier)
        self.prototype_centroids: np.ndarray | None = None
        self.encoder_identity: dict[str, Any] = {}
        self.protodiff_meta: dict[str, Any] = {}
        self.interrupt = False

    # -- properties -------------------------------------------------------------------------------
    @property
    def num_prototypes(self) -> int:
        if self.classifier is not None:
            return int(self.classifier.config.num_prototypes)
        n = self.unet.config.num_class_embeds
        return int(n - 1) if n else 0

    @property
    def class_conditional(self) -> bool:
        return bool(self.unet.config.num_class_embeds)

    def set_scheduler(self, name: str) -> None:
        """Swap the sampler (``ddim``, ``ddpm``, ``dpm++``) keeping the noise schedule."""
        from .unet import scheduler_from

        self.scheduler = scheduler_from(self.scheduler.config, name)

    # -- saving / loading (see .bundle) -------------------------------------------------------------
    def save_pretrained(self, save_directory, **kwargs) -> None:  # type: ignore[override]
        from .bundle import save_bundle

        save_bundle(self, save_directory, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, device: str | torch.device | None = None,
                        **kwargs) -> "PrototypeGuidedPipeline":  # type: ignore[override]
        from .bundle import load_bundle

        return load_bundle(pretrained_model_name_or_path, device=device)

    # -- sampling ---------------------------------------------------------------------------------
    def _guidance_grad(self, latents: torch.Tensor, t: torch.Tensor, log_w: torch.Tensor | None,
                       onehot: torch.Tensor | None) -> torch.Tensor:
        """grad_x log sum_y w_y p(y | x_t): autograd through the classifier only (not its time embedding)."""
        emb = self.classifier.embed_time(t.reshape(1).to(latents.device))  # no grad needed w.r.t. x
        with torch.enable_grad():
            x = latents.detach().requires_grad_(True)
            logp = torch.log_softmax(self.classifier.classify(x, emb).float(), dim=-1)
            sel = (logp * onehot).sum() if onehot is not None else torch.logsumexp(logp + log_w, dim=-1).sum()
            (grad,) = torch.autograd.grad(sel, x)
        return grad

    @staticmethod
    def _clip_x0(out: torch.Tensor, latents: torch.Tensor, abar: float, c: float, v_pred: bool) -> torch.Tensor:
        """The model output whose predicted clean latent is that of ``out`` clipped to [-c, c].

        With ``x_t = a x0 + b eps`` (a = sqrt(alphabar), b = sqrt(1 - alphabar)), moving ``x0``
        by ``-d`` at fixed ``x_t`` moves ``eps`` by ``+a d / b`` and ``v = a eps - b x0`` by ``+d / b``.
        Computed on ``y = a x0`` (``x_t - b eps``, or ``a (a x_t - b v)``), four element-wise ops.
        """
        a, b = abar ** 0.5, (1.0 - abar) ** 0.5
        if v_pred:
            y = torch.add(latents, out, alpha=-b / a).mul_(a * a)
        else:
            y = torch.add(latents, out, alpha=-b)
        d = y - y.clamp(-c * a, c * a)  # a times the clipped part of x0
        return out.add_(d, alpha=(1.0 / (a * b)) if v_pred else (1.0 / b))

    @torch.no_grad()
    def __call__(
        self,
        prototypes: Any = None,
        num_images: int = 1,
        guidance_scale: float = 0.0,
        num_inference_steps: int = 50,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        cfg_scale: float | None = None,
        guidance_x0_clip: float | None = 3.0,
        guidance_min_t: float = GUIDANCE_MIN_T,
        output_type: str = "np",
        return_dict: bool = True,
        callback_on_step_end: Callable[["PrototypeGuidedPipeline", int, Any, dict], dict | None] | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    ):
        """Sample ``num_images`` latents, guided toward ``prototypes``, and decode them."""
        if num_images < 1:
            raise SamplingError(f"The number of images must be at least 1, not {num_images}.")
        if not guidance_scale >= 0 or guidance_scale > 1000:
            raise SamplingError(f"The guidance scale must lie between 0 and 1000, not {guidance_scale}.")
        if num_inference_steps < 1:
            raise SamplingError(f"The number of steps must be at least 1, not {num_inference_steps}.")
        if not 0.0 <= guidance_min_t < 1.0:
            raise SamplingError(f"The lowest noise level that is guided must lie in [0, 1), not {guidance_min_t}.")
        if guidance_x0_clip is not None and not guidance_x0_clip > 0:
            raise SamplingError(f"The clip of the guided clean latent must be positive or None, not {guidance_x0_clip}.")
        k = self.num_prototypes
        guided = guidance_scale > 0
        if guided and self.classifier is None:
            raise SamplingError("This model has no prototype classifier; sample with guidance 0 or cfg_scale.")
        if cfg_scale is not None and not self.class_conditional:
            raise SamplingError("This model's UNet was not trained with prototype ids; classifier-free guidance "
                                "(cfg_scale) needs train-diffusion --cfg.")
        if (guided or cfg_scale is not None) and prototypes is None:
            raise PrototypeError("Guided sampling needs prototypes: an id, a list, weights or 'balanced'.")
        if isinstance(generator, list) and len(generator) != num_images:
            raise SamplingError(f"{len(generator)} generators given for {num_images} images.")
        w, requested = target_weights(prototypes, num_images, max(k, 1))
        device = self._execution_device
        dtype = self.unet.dtype
        shape = (num_images, self.unet.config.in_channels, self.unet.config.sample_size, self.unet.config.sample_size)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        else:
            latents = latents.to(device=device, dtype=dtype)
        latents = latents * self.scheduler.init_noise_sigma
        log_w = onehot = None
        if guided and (requested >= 0).all():  # one prototype per image: log p(y | x) itself
            onehot = torch.from_numpy(w).to(device)
        elif guided:  # a mixture: log sum_y w_y p(y | x)
            log_w = torch.from_numpy(np.log(np.maximum(w, 1e-30))).to(device)
        class_labels = None
        if cfg_scale is not None:
            if (requested < 0).any():
                raise PrototypeError("Classifier-free guidance needs one prototype per image, not a mixture.")
            cond = torch.from_numpy(requested).to(device)
            class_labels = torch.cat([cond, torch.full_like(cond, k)])
        elif self.class_conditional:
            class_labels = torch.full((num_images,), k, device=device, dtype=torch.long)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        alphas = self.scheduler.alphas_cumprod.to(device)
        v_pred = self.scheduler.config.prediction_type == "v_prediction"
        t_min = guidance_min_t * self.scheduler.config.num_train_timesteps  # guided steps: t >= t_min
        self.interrupt = False
        for i, t in enumerate(self.scheduler.timesteps):
            if self.interrupt:
                break
            model_in = self.scheduler.scale_model_input(latents, t)
            if cfg_scale is not None:
                out = self.unet(torch.cat([model_in, model_in]), t, class_labels=class_labels).sample
                cond_out, uncond_out = out.chunk(2)
                out = uncond_out + cfg_scale * (cond_out - uncond_out)
            else:
                out = self.unet(model_in, t, class_labels=class_labels).sample
            if guided and int(t) >= t_min:
                grad = self._guidance_grad(latents, t, log_w, onehot)
                abar = alphas[t]
                coef = guidance_scale * (1 - abar).sqrt() / (abar.sqrt() if v_pred else 1.0)
                out = out.sub_(grad.to(out.dtype), alpha=float(coef))
                if guidance_x0_clip is not None:
                    out = self._clip_x0(out, latents, float(abar), float(guidance_x0_clip), v_pred)
            latents = self.scheduler.step(out, t, latents, generator=generator).prev_sample
            if callback_on_step_end is not None:
                scope = locals()
                kwargs = {}
                for name in callback_on_step_end_tensor_inputs:
                    kwargs[name] = scope[name]
                res = callback_on_step_end(self, i, t, kwargs)
                if res:
                    latents = res.pop("latents", latents)
        if output_type == "latent":
            images = latents
        else:
            from .autoencoder import decode_latents

            images = torch.cat([decode_latents(self.vae, latents[j:j + 64]) for j in range(0, len(latents), 64)])
            if output_type != "pt":
                images = images.permute(0, 2, 3, 1).float().cpu().numpy()
                if output_type == "pil":
                    images = self.numpy_to_pil(images)
        if not return_dict:
            return images, requested
        return PrototypeSampleOutput(images=images, prototypes=requested)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) float in [0, 1] -> uint8."""
    return (np.clip(images, 0, 1) * 255 + 0.5).astype(np.uint8)
