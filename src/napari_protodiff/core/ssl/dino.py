"""DINO's parts: timm ViT backbone + lightly's DINO head (student and EMA teacher), lightly's loss, schedules.

From lightly we use :class:`lightly.models.modules.DINOProjectionHead` (3-layer MLP,
l2-normalised bottleneck, weight-normalised last layer, last-layer freezing),
:class:`lightly.loss.DINOLoss` (cross-entropy between teacher and student views,
teacher centering with a momentum centre that is all-reduced under DDP),
:func:`lightly.utils.scheduler.cosine_schedule` and
:func:`lightly.models.utils.update_momentum` (the EMA teacher update). The backbone is
a timm VisionTransformer built without downloading anything (``pretrained=False``),
with ``dynamic_img_size`` so global and local crops go through the same network.

:class:`MultiCrop` runs the backbone once per crop *resolution* (all global crops in
one batch, all local crops in another), like DINO's ``MultiCropWrapper``, and the head
once on all features, instead of once per view.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from .config import PretrainConfig


def build_backbone(cfg: PretrainConfig, drop_path: float | None = None) -> nn.Module:
    """The timm ViT of ``cfg.arch`` with ``cfg.patch_size`` tokens at ``cfg.global_size`` px, no classifier."""
    import timm

    return timm.create_model(
        cfg.timm_name, pretrained=False, num_classes=0, img_size=cfg.global_size, patch_size=cfg.patch_size,
        dynamic_img_size=True, drop_path_rate=cfg.drop_path if drop_path is None else drop_path,
    )


def build_head(cfg: PretrainConfig, in_dim: int) -> nn.Module:
    import warnings

    from lightly.models.modules import DINOProjectionHead

    with warnings.catch_warnings():  # lightly still uses torch.nn.utils.weight_norm
        warnings.simplefilter("ignore", FutureWarning)
        return DINOProjectionHead(in_dim, cfg.hidden_dim, cfg.bottleneck_dim, cfg.out_dim,
                                  freeze_last_layer=cfg.freeze_last_layer, norm_last_layer=cfg.norm_last_layer)


class MultiCrop(nn.Module):
    """backbone + head over a list of views; views of one size run as one batch."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, views: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        feats, start = [], 0
        while start < len(views):
            end = start
            while end < len(views) and views[end].shape[-1] == views[start].shape[-1]:
                end += 1
            feats.append(self.backbone(torch.cat(list(views[start:end]))))
            start = end
        out = self.head(torch.cat(feats))
        return list(out.chunk(len(views)))


class DINO(nn.Module):
    """Student and teacher (same architecture; the teacher has no drop-path and no gradients)."""

    def __init__(self, cfg: PretrainConfig) -> None:
        super().__init__()
        from lightly.models.utils import deactivate_requires_grad

        sb = build_backbone(cfg)
        dim = sb.num_features
        self.student = MultiCrop(sb, build_head(cfg, dim))
        self.teacher = MultiCrop(build_backbone(cfg, drop_path=0.0), build_head(cfg, dim))
        self.teacher.load_state_dict(self.student.state_dict())
        deactivate_requires_grad(self.teacher)
        self.embed_dim = dim

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        from lightly.models.utils import update_momentum

        update_momentum(self.student, self.teacher, m=momentum)


def make_loss(cfg: PretrainConfig) -> nn.Module:
    from lightly.loss import DINOLoss

    return DINOLoss(output_dim=cfg.out_dim, warmup_teacher_temp=cfg.warmup_teacher_temp, teacher_temp=cfg.teacher_temp,
                    warmup_teacher_temp_epochs=max(1, cfg.warmup_teacher_temp_epochs), student_temp=cfg.student_temp,
                    center_momentum=cfg.center_momentum)


def param_groups(module: nn.Module) -> list[dict]:
    """Weights get weight decay; biases and norm parameters (1-D) do not (as in DINO)."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "apply_wd": True}, {"params": no_decay, "apply_wd": False, "weight_decay": 0.0}]


class Schedules:
    """Per-step learning rate, weight decay, teacher momentum and per-epoch teacher temperature."""

    def __init__(self, cfg: PretrainConfig, steps_per_epoch: int, world: int = 1) -> None:
        self.cfg, self.spe = cfg, steps_per_epoch
        self.total = cfg.epochs * steps_per_epoch
        self.peak_lr = cfg.lr * cfg.batch_size * world / 256.0
        self.warmup = min(cfg.warmup_epochs * steps_per_epoch, self.total)

    def lr(self, step: int) -> float:
        from lightly.utils.scheduler import cosine_schedule

        if step < self.warmup:
            return self.peak_lr * step / self.warmup
        return cosine_schedule(step - self.warmup, max(1, self.total - self.warmup), self.peak_lr, self.cfg.min_lr)

    def weight_decay(self, step: int) -> float:
        from lightly.utils.scheduler import cosine_schedule

        return cosine_schedule(step, max(1, self.total), self.cfg.weight_decay, self.cfg.weight_decay_end)

    def momentum(self, step: int) -> float:
        from lightly.utils.scheduler import cosine_schedule

        return cosine_schedule(step, max(1, self.total), self.cfg.momentum_teacher, 1.0)

    def teacher_temp(self, epoch: int) -> float:
        c = self.cfg
        if epoch < c.warmup_teacher_temp_epochs:
            t = epoch / max(1, c.warmup_teacher_temp_epochs - 1) if c.warmup_teacher_temp_epochs > 1 else 1.0
            return c.warmup_teacher_temp + (c.teacher_temp - c.warmup_teacher_temp) * t
        return c.teacher_temp


def clip_gradients(module: nn.Module, clip: float) -> float:
    """DINO's clipping: each parameter tensor's gradient norm at most ``clip``; returns the total norm."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return 0.0
    norms = torch._foreach_norm(grads, 2)
    if clip > 0:
        coefs = [torch.clamp(clip / (n + 1e-6), max=1.0) for n in norms]
        torch._foreach_mul_(grads, coefs)
    return float(torch.stack(norms).norm(2))


def is_finite(x: float) -> bool:
    return math.isfinite(x)
