"""The one transform factory (albumentations 2.x) shared by training, validation and test-time augmentation."""
from __future__ import annotations

from dataclasses import dataclass

import albumentations as A
import cv2
from albumentations.pytorch import ToTensorV2


@dataclass(frozen=True)
class AugParams:
    """Augmentation strengths (params.yaml `augment`); a probability of 0 switches a transform off."""
    flip: float = 0.5          # p of each of horizontal flip, vertical flip, and a random 90-degree rotation
    affine: float = 0.5        # p of a random shift/scale/rotate
    shift: float = 0.06        # max translation as a fraction of the side
    scale: float = 0.1         # scale in [1 - scale, 1 + scale]
    rotate: float = 20         # max rotation in degrees
    color: float = 0.5         # p of brightness/contrast and of hue/saturation jitter
    brightness: float = 0.15
    contrast: float = 0.15
    hue: int = 8               # hue shift in OpenCV units (0-180 scale)
    saturation: int = 15
    blur: float = 0.1          # p of a light Gaussian blur
    noise: float = 0.1         # p of light Gaussian noise
    dropout: float = 0.2       # p of coarse dropout (1-3 holes of 5-15% of the side)


def build_transform(train: bool, aug: AugParams, mean: tuple, std: tuple) -> A.Compose:
    """Training: augment then normalise; evaluation/TTA: normalise only (TTA views act on the batched tensors)."""
    ops = []
    if train:
        ops = [
            A.HorizontalFlip(p=aug.flip),
            A.VerticalFlip(p=aug.flip),
            A.RandomRotate90(p=aug.flip),
            # Cells sit on a black background, so pad with black.
            A.Affine(translate_percent=(-aug.shift, aug.shift), scale=(1 - aug.scale, 1 + aug.scale),
                     rotate=(-aug.rotate, aug.rotate), border_mode=cv2.BORDER_CONSTANT, fill=0, p=aug.affine),
            A.RandomBrightnessContrast(brightness_limit=aug.brightness, contrast_limit=aug.contrast, p=aug.color),
            A.HueSaturationValue(hue_shift_limit=aug.hue, sat_shift_limit=aug.saturation, val_shift_limit=0,
                                 p=aug.color),
            A.GaussianBlur(blur_limit=(3, 3), sigma_limit=(0.3, 0.8), p=aug.blur),
            A.GaussNoise(std_range=(0.01, 0.04), p=aug.noise),
            A.CoarseDropout(num_holes_range=(1, 3), hole_height_range=(0.05, 0.15), hole_width_range=(0.05, 0.15),
                            fill=0, p=aug.dropout),
        ]
    return A.Compose([*ops, A.Normalize(mean=mean, std=std, max_pixel_value=255.0), ToTensorV2()])
