"""Decoding and normalising cell images: the one preprocessing path of the cache, the transforms and `predict`."""
from __future__ import annotations

import hashlib
import warnings
from contextlib import contextmanager
from typing import BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.lib.common import PipelineError

# Only these decoders run: Pillow otherwise picks one of ~40 by the file's bytes, whatever its name (a `.png` holding
# PostScript starts Ghostscript). Cells come as PNG (NIH, Kaggle) or JPEG (phone and microscope cameras); nothing else.
FORMATS = ("PNG", "JPEG")
# A cell is a few hundred pixels a side; 25 M pixels (5000 x 5000) is a whole slide photo. Above it an image is refused
# before its pixels are decoded, well under Pillow's own decompression-bomb threshold (89 M, a warning only).
MAX_PIXELS = 25_000_000
# Transparent pixels are composited on black: the NIH cells' own padding around the cell is black (0, 0, 0).
BACKGROUND = (0, 0, 0)
# Pillow's decompression-bomb warning is an error in every process that decodes through this module.
warnings.simplefilter("error", Image.DecompressionBombWarning)


class NotAnImage(PipelineError):
    """A file that is no PNG or JPEG image this pipeline decodes (or one too large to be a cell)."""


@contextmanager
def open_image(source: str | BinaryIO):
    """Image.open restricted to PNG and JPEG, refusing more than MAX_PIXELS before any pixel is decoded."""
    try:
        im = Image.open(source, formats=FORMATS)
    except UnidentifiedImageError:
        head = _head(source)
        raise NotAnImage(f"not an image: neither PNG nor JPEG (it starts with {head!r})") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise NotAnImage(f"not a cell image: {e}") from None
    with im:
        w, h = im.size
        if w * h > MAX_PIXELS:
            raise NotAnImage(f"not a cell image: {w} x {h} pixels, more than the {MAX_PIXELS:,} this pipeline decodes")
        yield im


def _head(source: str | BinaryIO) -> bytes:
    """The first bytes of a file, for a message about what it is instead."""
    try:
        if isinstance(source, (str, bytes)) or hasattr(source, "__fspath__"):
            with open(source, "rb") as f:
                return f.read(12)
        source.seek(0)
        return source.read(12)
    except (OSError, ValueError):
        return b""


def to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB with the picture's real values: 16-bit grey scaled (not clipped at 255), alpha composited on
    BACKGROUND (not dropped)."""
    if im.mode.startswith("I"):  # a 16-bit grey PNG ("I;16" or "I"): 0-65535, scaled to 0-255
        grey = np.asarray(im, dtype=np.int64)
        alpha = None
        if isinstance(key := im.info.get("transparency"), int):  # a transparent grey value (tRNS)
            alpha = Image.fromarray(np.where(grey == key, 0, 255).astype(np.uint8))
        im = Image.fromarray(np.clip(np.rint(grey / 257), 0, 255).astype(np.uint8), "L")
        if alpha is not None:
            im.putalpha(alpha)
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (*BACKGROUND, 255)), rgba).convert("RGB")
    return im.convert("RGB")


def decode(source: str | BinaryIO, size: int) -> tuple[np.ndarray, int, int, str]:
    """Decode one image (a path or an open file) to RGB at size x size; returns the uint8 array, the original
    width and height, and a hash of the original pixels. Anything but a PNG or JPEG raises NotAnImage."""
    with open_image(source) as im:
        im.load()
        w, h = im.size
        rgb = to_rgb(im)
    digest = hashlib.sha1(np.asarray(rgb).tobytes() + f"{w}x{h}".encode()).hexdigest()
    return np.asarray(rgb.resize((size, size), Image.Resampling.BILINEAR)), w, h, digest


def normalize(images: np.ndarray, mean: tuple, std: tuple) -> np.ndarray:
    """(N, H, W, 3) uint8 RGB to the float32 (N, 3, H, W) network input: (pixel / 255 - mean) / std, as the
    evaluation transform (albumentations Normalize + ToTensorV2) computes it."""
    x = images.astype(np.float32)
    x -= np.asarray(mean, np.float32) * 255
    x *= 1 / (np.asarray(std, np.float32) * 255)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
