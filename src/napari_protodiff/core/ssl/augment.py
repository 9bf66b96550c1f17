"""H&E multi-crop augmentations for DINO, on uint8 tensors.

Two global crops and ``n_local`` local crops per patch, as in DINO, but with the
augmentations suited to stained tissue instead of natural images:

* random resized crop (global 40-100 %, local 5-40 % of the area by default)
* horizontal and vertical flips and 90-degree rotations (tissue has no "up")
* *limited* colour jitter (brightness, contrast; saturation and hue at a quarter and a
  tenth of that strength) and HED stain jitter (haematoxylin, eosin, DAB optical
  densities scaled and shifted, Tellez et al. 2018), instead of DINO's strong jitter,
  grey-scale and solarisation, which produce colours no stain gives
* Gaussian blur with DINO's per-view probabilities (1.0, 0.1, 0.5), its sigma range
  scaled to the crop size (DINO's 0.1-2 px are meant for 224-px crops)

lightly's ``DINOTransform`` works on PIL images one op at a time and has no stain
jitter, so these are written on torchvision's tensor ops. Every random choice comes
from torch's global generator, which the dataset seeds per (epoch, image), so the views
of an image do not depend on the number of worker processes.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# skimage.color's H&E-DAB stain matrix (Ruifrok & Johnston) and its inverse.
_RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float32)
_RGB_FROM_HED[2] = torch.linalg.cross(_RGB_FROM_HED[0], _RGB_FROM_HED[1])
_RGB_FROM_HED = _RGB_FROM_HED / _RGB_FROM_HED.norm(dim=1, keepdim=True)
_HED_FROM_RGB = torch.linalg.inv(_RGB_FROM_HED)


def hed_jitter(img: torch.Tensor, sigma: float) -> torch.Tensor:
    """Scale each stain's optical density by U(1-sigma, 1+sigma) and shift it by U(-sigma, sigma); img is (3, H, W) in [0, 1]."""
    if sigma <= 0:
        return img
    alpha = 1 + (torch.rand(3) * 2 - 1) * sigma
    beta = (torch.rand(3) * 2 - 1) * sigma
    od = -torch.log(img.clamp_min(1e-6) * (255.0 / 256.0) + 1.0 / 256.0)  # (3, H, W), >= 0
    hed = torch.einsum("chw,cd->dhw", od, _HED_FROM_RGB)
    hed = hed * alpha[:, None, None] + beta[:, None, None]
    od2 = torch.einsum("dhw,dc->chw", hed, _RGB_FROM_HED)
    return ((torch.exp(-od2) - 1.0 / 256.0) * (256.0 / 255.0)).clamp(0, 1)


def _resized_crop(img: torch.Tensor, size: int, scale: tuple[float, float], ratio=(3 / 4, 4 / 3)) -> torch.Tensor:
    """torchvision's RandomResizedCrop (same sampling) on a (3, H, W) float tensor."""
    _, h, w = img.shape
    area = h * w
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * float(torch.empty(1).uniform_(scale[0], scale[1]))
        ar = math.exp(float(torch.empty(1).uniform_(*log_ratio)))
        cw = int(round(math.sqrt(target * ar)))
        ch = int(round(math.sqrt(target / ar)))
        if 0 < cw <= w and 0 < ch <= h:
            i = int(torch.randint(0, h - ch + 1, (1,)))
            j = int(torch.randint(0, w - cw + 1, (1,)))
            break
    else:  # centre crop
        ch, cw = h, w
        i, j = 0, 0
    crop = img[:, i : i + ch, j : j + cw]
    return F.interpolate(crop[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]


def _color_jitter(img: torch.Tensor, strength: float) -> torch.Tensor:
    from torchvision.transforms.v2 import functional as TF

    if strength <= 0:
        return img
    ops = torch.randperm(4).tolist()
    b = 1 + float(torch.empty(1).uniform_(-strength, strength))
    c = 1 + float(torch.empty(1).uniform_(-strength, strength))
    s = 1 + float(torch.empty(1).uniform_(-strength / 4, strength / 4))
    hh = float(torch.empty(1).uniform_(-strength / 10, strength / 10))
    for op in ops:
        if op == 0:
            img = TF.adjust_brightness(img, b)
        elif op == 1:
            img = TF.adjust_contrast(img, c)
        elif op == 2:
            img = TF.adjust_saturation(img, s)
        elif hh != 0:
            img = TF.adjust_hue(img, hh)
    return img


def _blur(img: torch.Tensor, size: int) -> torch.Tensor:
    from torchvision.transforms.v2 import functional as TF

    smax = max(0.2, 2.0 * size / 224)
    sigma = float(torch.empty(1).uniform_(0.1, smax))
    k = 2 * math.ceil(3 * smax) + 1
    return TF.gaussian_blur(img, [k, k], [sigma, sigma])


class HEMultiCrop:
    """Patch (H, W, 3) uint8 array -> list of normalised float views (2 global, then the locals)."""

    def __init__(self, global_size: int, local_size: int, n_local: int, global_scale=(0.4, 1.0),
                 local_scale=(0.05, 0.4), color_jitter: float = 0.2, stain_jitter: float = 0.03,
                 blur_probs=(1.0, 0.1, 0.5), mean=IMAGENET_MEAN, std=IMAGENET_STD) -> None:
        self.global_size, self.local_size, self.n_local = global_size, local_size, n_local
        self.global_scale, self.local_scale = tuple(global_scale), tuple(local_scale)
        self.color_jitter, self.stain_jitter, self.blur_probs = color_jitter, stain_jitter, blur_probs
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def view(self, img: torch.Tensor, size: int, scale, p_blur: float) -> torch.Tensor:
        x = _resized_crop(img, size, scale)
        if torch.rand(1) < 0.5:
            x = x.flip(-1)
        if torch.rand(1) < 0.5:
            x = x.flip(-2)
        k = int(torch.randint(0, 4, (1,)))
        if k:
            x = torch.rot90(x, k, dims=(-2, -1))
        if torch.rand(1) < 0.8:
            x = _color_jitter(x, self.color_jitter)
        if torch.rand(1) < 0.5:
            x = hed_jitter(x, self.stain_jitter)
        if torch.rand(1) < p_blur:
            x = _blur(x, size)
        return ((x.clamp(0, 1) - self.mean) / self.std).contiguous()

    def __call__(self, patch) -> list[torch.Tensor]:
        img = torch.from_numpy(np.array(patch, dtype=np.uint8)).permute(2, 0, 1).float().div_(255.0)
        g0, g1, pl = self.blur_probs
        views = [self.view(img, self.global_size, self.global_scale, g0),
                 self.view(img, self.global_size, self.global_scale, g1)]
        views += [self.view(img, self.local_size, self.local_scale, pl) for _ in range(self.n_local)]
        return views

    @classmethod
    def from_config(cls, cfg) -> "HEMultiCrop":
        return cls(cfg.global_size, cfg.local_size, cfg.n_local, cfg.global_scale, cfg.local_scale,
                   cfg.color_jitter, cfg.stain_jitter)
