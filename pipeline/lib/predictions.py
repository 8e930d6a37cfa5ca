"""Predicting with a run's models: the evaluation dataset, which checkpoints a backbone's predictions come from,
predicting and averaging them, and the prediction CSVs (img_name, prob, prob_tta) the later stages read."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline.lib import distributed as ddp
from pipeline.lib.checkpoints import load_checkpoint
from pipeline.lib.common import PipelineError, written_whole
from pipeline.lib.dataset import CellDataset, split_rows, targets
from pipeline.lib.engine import InferConfig, predict, resolve_device
from pipeline.lib.layout import prediction_dirs
from pipeline.lib.transforms import AugParams, build_transform
from pipeline.lib.tta import TTASpec


def eval_dataset(images: np.ndarray, norm: dict) -> CellDataset:
    """Images as every prediction sees them: normalised with the model's mean/std (`norm`, its data_config), never
    augmented (the TTA views act on whole batches); the targets are placeholders."""
    return CellDataset(images, targets(np.zeros(len(images))), build_transform(False, AugParams(), **norm))


def backbone_probs(models_dir: Path, backbone: str, refit: bool, images: np.ndarray, tta: TTASpec,
                   cfg: InferConfig) -> np.ndarray:
    """One backbone's p(parasitized) per image: the mean over its views (tta) of each of its models (prediction_dirs),
    averaged over the models, as the ensemble stage averages their CSVs."""
    files = [d / "checkpoint.pt" for d in prediction_dirs(models_dir, backbone, refit)]
    if not files or not files[0].is_file():
        raise PipelineError(f"{models_dir / backbone} has no {'refit' if refit else 'fold'} checkpoints: run "
                            f"`dvc repro train@{backbone}`.")
    device = resolve_device(cfg.device)
    per_model = []
    for ckpt in files:
        model, ck = load_checkpoint(ckpt, device)
        if ck["params"]["img_size"] != images.shape[1]:
            raise PipelineError(f"{ckpt} was trained at {ck['params']['img_size']} px, the others at "
                                f"{images.shape[1]} px: re-run `dvc repro`.")
        ds = eval_dataset(images, ck["data_config"])
        per_model.append(predict(model, ds, cfg, device, list(tta.views), tta.crop_scale, desc=str(ckpt)).mean(1))
    return np.mean(per_model, 0)


def write_predictions(model: torch.nn.Module, images: np.ndarray, index: pd.DataFrame, rows: np.ndarray,
                      out_csv: Path, cfg: InferConfig, tta: TTASpec, norm: dict) -> pd.DataFrame:
    """Write and return img_name, prob (plain) and prob_tta (mean over the TTA views) for the given cache rows.

    Under DDP every rank predicts a shard and gets the whole table; rank 0 writes it."""
    names = ["identity", *[v for v in tta.views if v != "identity"]]
    probs = predict(model, eval_dataset(images[rows], norm), cfg, resolve_device(cfg.device), names, tta.crop_scale,
                    desc=out_csv.stem, shard=True)
    df = pd.DataFrame({"img_name": index["img_name"].to_numpy()[rows], "prob": probs[:, 0],
                       "prob_tta": probs[:, [names.index(v) for v in tta.views]].mean(1)})
    _write_csv(df, out_csv)
    return df


def _write_csv(df: pd.DataFrame, path: Path) -> None:
    if ddp.is_main():
        with written_whole(path) as tmp:  # a later stage never reads a truncated table
            df.to_csv(tmp, index=False, float_format="%.6f")


def write_split_predictions(model: torch.nn.Module, images: np.ndarray, index: pd.DataFrame, out: Path,
                            cfg: InferConfig, tta: TTASpec, norm: dict, splits=("test", "hidden")
                            ) -> dict[str, pd.DataFrame]:
    """write_predictions for each split into out/<split>.csv; a split holding the same images as an earlier one (the
    public layout's hidden set is its test holdout) reuses that table instead of predicting them again."""
    # Same images: the same names with the same content digests (prepare's `hash`), in the same order.
    keys = index[["img_name", "hash"]].to_numpy() if "hash" in index else None
    tables, done = {}, {}
    for split in splits:
        rows = split_rows(index, split)
        same = next((s for s, r in done.items()
                     if keys is not None and len(r) == len(rows) and (keys[r] == keys[rows]).all()), None)
        if same is None:
            tables[split] = write_predictions(model, images, index, rows, out / f"{split}.csv", cfg, tta, norm)
            done[split] = rows
        else:
            tables[split] = tables[same]
            _write_csv(tables[split], out / f"{split}.csv")
    return tables
