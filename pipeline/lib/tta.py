"""Test-time augmentation views (the D4 flips/rotations and crops) on batched torch tensors or numpy arrays.

torch is not imported here: `pipeline.predict` applies the same views to numpy batches for ONNX Runtime."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.lib.views import expand_views



def _resize_np(x: np.ndarray, h: int, w: int) -> np.ndarray:
    """Bilinear resize of (..., H, W) to (h, w) as torch's interpolate(align_corners=False, antialias=False)."""
    def axis(n_in: int, n_out: int):
        src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0)
        i0 = np.minimum(src.astype(int), n_in - 1)
        return i0, np.minimum(i0 + 1, n_in - 1), (src - i0).astype(x.dtype)

    (r0, r1, wr), (c0, c1, wc) = axis(x.shape[-2], h), axis(x.shape[-1], w)
    rows = x[..., r0, :] * (1 - wr)[:, None] + x[..., r1, :] * wr[:, None]
    return rows[..., c0] * (1 - wc) + rows[..., c1] * wc


def _crop(x, where: str, scale: float):
    """Crop a `scale` fraction of the side at `where` and resize back to the input size."""
    h, w = x.shape[-2:]
    ch, cw = max(1, round(h * scale)), max(1, round(w * scale))
    top = {"center": (h - ch) // 2, "tl": 0, "tr": 0, "bl": h - ch, "br": h - ch}[where]
    left = {"center": (w - cw) // 2, "tl": 0, "tr": w - cw, "bl": 0, "br": w - cw}[where]
    return _resize(x[..., top:top + ch, left:left + cw], h, w)


def _resize(x, h: int, w: int):
    if isinstance(x, np.ndarray):
        return _resize_np(x, h, w)
    import torch.nn.functional as F

    return F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=False)


def apply_view(x, name: str, crop_scale: float = 0.875):
    """One named view of a (N, C, H, W) batch, a torch tensor or a numpy array (same result for both)."""
    numpy = isinstance(x, np.ndarray)
    if "+" in name:
        for part in name.split("+"):
            x = apply_view(x, part, crop_scale)
        return x
    if name.startswith("scale_"):
        side = [max(8, round(n * int(name[6:]) / 100)) for n in x.shape[-2:]]
        return _resize(x, *side)
    if name == "identity":
        return x
    if name.startswith("rot"):
        k = int(name[3:]) // 90  # counter-clockwise
        return np.rot90(x, k, axes=(-2, -1)) if numpy else x.rot90(k, dims=(-2, -1))
    if name == "hflip":
        return np.flip(x, -1) if numpy else x.flip(-1)
    if name == "vflip":
        return np.flip(x, -2) if numpy else x.flip(-2)
    if name == "transpose":
        return np.swapaxes(x, -2, -1) if numpy else x.transpose(-2, -1)
    if name == "antitranspose":
        return np.swapaxes(np.flip(x, (-2, -1)), -2, -1) if numpy else x.flip(-1).flip(-2).transpose(-2, -1)
    if name.startswith("crop_"):
        return _crop(x, name[5:], crop_scale)
    raise ValueError(f"unknown TTA view {name!r}")


@dataclass(frozen=True)
class TTASpec:
    """The test-time augmentation of a run: its views (groups expanded) and the crops' scale."""
    views: tuple[str, ...] = ("identity",)
    crop_scale: float = 0.875

    @classmethod
    def from_params(cls, tta: dict) -> "TTASpec":
        """From params.yaml's tta section (or the copy a run recorded in data/ensemble/scores.json)."""
        return cls(tuple(expand_views(tta["views"])), tta["crop_scale"])
