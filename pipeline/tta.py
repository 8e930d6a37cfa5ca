"""Test-time augmentation views (the D4 flips/rotations and crops) applied to batched image tensors."""
from __future__ import annotations

import torch
import torch.nn.functional as F

D4 = ["identity", "rot90", "rot180", "rot270", "hflip", "vflip", "transpose", "antitranspose"]
CROPS = ["crop_center", "crop_tl", "crop_tr", "crop_bl", "crop_br"]
GROUPS = {"d4": D4, "five_crop": CROPS}


def _crop(x: torch.Tensor, where: str, scale: float) -> torch.Tensor:
    """Crop a `scale` fraction of the side at `where` and resize back to the input size."""
    h, w = x.shape[-2:]
    ch, cw = max(1, round(h * scale)), max(1, round(w * scale))
    top = {"center": (h - ch) // 2, "tl": 0, "tr": 0, "bl": h - ch, "br": h - ch}[where]
    left = {"center": (w - cw) // 2, "tl": 0, "tr": w - cw, "bl": 0, "br": w - cw}[where]
    patch = x[..., top:top + ch, left:left + cw]
    return F.interpolate(patch, size=(h, w), mode="bilinear", align_corners=False, antialias=False)


def apply_view(x: torch.Tensor, name: str, crop_scale: float = 0.875) -> torch.Tensor:
    """One named view of a (N, C, H, W) batch."""
    if name == "identity":
        return x
    if name.startswith("rot"):
        return torch.rot90(x, k=int(name[3:]) // 90, dims=(-2, -1))  # counter-clockwise
    if name == "hflip":
        return x.flip(-1)
    if name == "vflip":
        return x.flip(-2)
    if name == "transpose":
        return x.transpose(-2, -1)
    if name == "antitranspose":
        return x.flip(-1).flip(-2).transpose(-2, -1)
    if name.startswith("crop_"):
        return _crop(x, name[5:], crop_scale)
    raise ValueError(f"unknown TTA view {name!r}")


def expand_views(views: list[str]) -> list[str]:
    """Expand groups (`d4`, `five_crop`) and check names; raises ValueError naming an unknown view."""
    out = []
    for v in views:
        for name in GROUPS.get(v, [v]):
            if name not in D4 + CROPS:
                raise ValueError(f"unknown TTA view {name!r} in tta.views; use {', '.join(D4 + CROPS)}, d4 or five_crop")
            if name not in out:
                out.append(name)
    return out
