"""The image cache (uint8 array + index) and the torch Dataset that reads it without decoding PNGs."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from pipeline.lib.common import PipelineError


def load_cache(prepared: Path) -> tuple[pd.DataFrame, np.ndarray]:
    """index.csv and images.npy of the prepare stage; the array is memory-mapped so workers share its pages."""
    index_csv, images_npy = prepared / "index.csv", prepared / "images.npy"
    for f in (index_csv, images_npy):
        if not f.is_file():
            raise PipelineError(f"{f} is missing: run `dvc repro prepare` first.")
    index = pd.read_csv(index_csv, dtype={"img_name": str})
    images = np.load(images_npy, mmap_mode="r")
    if len(images) != len(index):
        raise PipelineError(f"{images_npy} has {len(images)} images but {index_csv} {len(index)} rows; "
                            "re-run `dvc repro prepare`.")
    return index, images


def split_rows(index: pd.DataFrame, split: str) -> np.ndarray:
    return np.flatnonzero(index["split"].to_numpy() == split)


class CellDataset(Dataset):
    """Rows of the uint8 image cache with a target row per image. The transform is re-seeded per sample
    from (seed, epoch, index), so results depend neither on the worker or process count nor on resuming."""

    def __init__(self, images: np.ndarray, targets: np.ndarray, transform, seed: int = 0):
        self.images, self.targets, self.transform, self.seed, self.epoch = images, targets, transform, seed, 0

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        # The training sampler tags indices with the epoch (engine.EpochTagged: epoch * n + i); plain indices use
        # self.epoch.
        epoch, i = divmod(i, len(self.images))
        self.transform.set_random_seed((self.seed * 1_000_003 + (epoch or self.epoch) * 10_007 + i) % 2**32)
        x = self.transform(image=np.array(self.images[i]))["image"]  # a writable copy of the mmap row
        return x, torch.as_tensor(self.targets[i], dtype=torch.float32)


def targets(labels: np.ndarray, soft: np.ndarray | None = None) -> np.ndarray:
    """(N, 2) rows of [label, soft target]; without a teacher the soft target is the label itself."""
    labels = np.nan_to_num(np.asarray(labels, dtype=np.float32), nan=0.0)
    return np.stack([labels, labels if soft is None else np.asarray(soft, np.float32)], 1)
