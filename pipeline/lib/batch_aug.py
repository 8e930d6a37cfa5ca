"""Batch-level training tricks applied in the training loop: mixup / CutMix on images and targets, progressive resizing."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def mix(x: torch.Tensor, y: torch.Tensor, mixup: float, cutmix: float, rng: np.random.Generator
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup or CutMix (each half of the batches when both alphas are > 0) with the reversed batch as partner, as
    timm's Mixup pairs them. Every target column ([label, teacher probability]) mixes with the same lambda, so the
    2-class targets stay distributions and the distillation target follows the pixels."""
    if mixup <= 0 and cutmix <= 0:
        return x, y
    use_cutmix = cutmix > 0 and (mixup <= 0 or rng.random() < 0.5)
    lam = float(rng.beta(cutmix, cutmix) if use_cutmix else rng.beta(mixup, mixup))
    if use_cutmix:
        # The box of timm's rand_bbox, drawn from `rng` (timm draws from the global numpy state, which a resumed
        # run does not restore); lam is corrected to the pasted area as timm's correct_lam does.
        h, w = x.shape[-2:]
        cut_h, cut_w = int(h * np.sqrt(1 - lam)), int(w * np.sqrt(1 - lam))
        cy, cx = int(rng.integers(h)), int(rng.integers(w))
        top, bottom = np.clip([cy - cut_h // 2, cy + cut_h // 2], 0, h)
        left, right = np.clip([cx - cut_w // 2, cx + cut_w // 2], 0, w)
        lam = 1 - (bottom - top) * (right - left) / (h * w)
        x = x.clone()
        x[..., top:bottom, left:right] = x.flip(0)[..., top:bottom, left:right]
    else:
        x = x * lam + x.flip(0) * (1 - lam)
    return x, y * lam + y.flip(0) * (1 - lam)


def progressive_size(epoch: int, epochs: int, full: int, start: float) -> int:
    """Side for `epoch` (1-based): from start * full in the first epoch rising linearly to full by the middle
    epoch, full from then on (start 1.0 = off). A multiple of 8, so strided backbones see whole feature maps."""
    if start >= 1 or epochs <= 1:
        return full
    ramp = max(1, epochs // 2)
    frac = start + (1 - start) * min(1.0, (epoch - 1) / ramp)
    return int(min(full, max(8, round(full * frac / 8) * 8)))


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """The batch at size x size (antialiased when shrinking), from the one full-size cache."""
    if x.shape[-1] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=size < x.shape[-1], align_corners=False)
