"""Decoding and normalising cell images: the one preprocessing path of the cache, the transforms and `predict`."""
from __future__ import annotations

import hashlib
from typing import BinaryIO

import numpy as np
from PIL import Image


def decode(source: str | BinaryIO, size: int) -> tuple[np.ndarray, int, int, str]:
    """Decode one image (a path or an open file) to RGB at size x size; returns the uint8 array, the original
    width and height, and a hash of the original pixels."""
    with Image.open(source) as im:
        im.load()
        w, h = im.size
        rgb = im.convert("RGB")  # RGBA, grayscale and palette images all become RGB
    digest = hashlib.sha1(np.asarray(rgb).tobytes() + f"{w}x{h}".encode()).hexdigest()
    return np.asarray(rgb.resize((size, size), Image.Resampling.BILINEAR)), w, h, digest


def normalize(images: np.ndarray, mean: tuple, std: tuple) -> np.ndarray:
    """(N, H, W, 3) uint8 RGB to the float32 (N, 3, H, W) network input: (pixel / 255 - mean) / std, as the
    evaluation transform (albumentations Normalize + ToTensorV2) computes it."""
    x = images.astype(np.float32)
    x -= np.asarray(mean, np.float32) * 255
    x *= 1 / (np.asarray(std, np.float32) * 255)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
