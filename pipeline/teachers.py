"""Training one teacher, a fold model or the refit model (train.refit), and writing its predictions: the train stage's
work, which `python -m pipeline.bench ablate` repeats with other params."""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import checkpoints
from pipeline.common import PipelineError, seed_everything
from pipeline.dataset import CellDataset, load_cache, targets
from pipeline.engine import TrainConfig
from pipeline.losses import LabelLoss
from pipeline.models import ModelSpec, data_config
from pipeline.predictions import eval_dataset, write_predictions, write_split_predictions
from pipeline.training import for_backbone, train_logged
from pipeline.transforms import AugParams, build_transform
from pipeline.tta import TTASpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Teacher:
    """What every model of one backbone shares, from params.yaml: the network, its augmentation and TTA, the params
    its fingerprint holds (`learned`) and those its checkpoints record (`params`)."""
    model: ModelSpec
    aug: AugParams
    tta: TTASpec
    learned: dict
    params: dict

    @classmethod
    def from_params(cls, params: dict, backbone: str) -> "Teacher":
        params = for_backbone(params, backbone)  # its own lr, and no other model's in its fingerprint
        p = params["train"]
        return cls(ModelSpec.from_params(p, backbone), AugParams(**params["augment"]),
                   TTASpec.from_params(params["tta"]),
                   checkpoints.learned_params(params, checkpoints.TEACHER_PARAMS),
                   {"train": p, "augment": params["augment"], "img_size": params["data"]["img_size"]})


def _fingerprint(teacher: Teacher, fold: int | str, prepared: Path, folds_csv: Path) -> dict:
    m = teacher.model
    return checkpoints.fingerprint(
        {**teacher.learned, "model.backbone": m.backbone, "model.fold": fold},
        {**checkpoints.data_digests(prepared, folds_csv),
         "weights": checkpoints.weights_digest(m.backbone, m.pretrained, m.weights_dir)})


def train_fold(prepared: Path, folds_csv: Path, out: Path, teacher: Teacher, *, fold: int, cfg: TrainConfig) -> dict:
    """Train (or resume, or reuse) one (backbone, fold) model and write its predictions."""
    index, images = load_cache(prepared)
    folds = pd.read_csv(folds_csv, dtype={"img_name": str})
    if fold not in set(folds["fold"]):
        raise PipelineError(f"Fold {fold} is not in {folds_csv} (folds {sorted(set(folds['fold']))}).")
    row_of = pd.Series(np.arange(len(index)), index=index["img_name"].where(index["split"] == "train"))
    tr, va = (row_of[folds.loc[m, "img_name"]].to_numpy() for m in (folds["fold"] != fold, folds["fold"] == fold))
    backbone = teacher.model.backbone
    best, oof = _fit_and_predict(index, images, tr, va, out, teacher, name=f"{backbone} fold {fold}", cfg=cfg,
                                 fingerprint=_fingerprint(teacher, fold, prepared, folds_csv))
    acc = ((oof["prob"].to_numpy() >= 0.5) == index["label"].to_numpy(dtype=float)[va]).mean()
    log.info("%s fold %d: kept epoch %d, OOF accuracy %.4f", backbone, fold, best["epoch"], acc)
    return best


def train_full(prepared: Path, folds_csv: Path, out: Path, teacher: Teacher, *, epochs: int, cfg: TrainConfig) -> dict:
    """The refit (train.refit): train (or resume, or reuse) one model on every cell of the folds for `epochs`,
    keeping the last epoch, and write its test/hidden predictions."""
    index, images = load_cache(prepared)
    folds = pd.read_csv(folds_csv, dtype={"img_name": str})
    row_of = pd.Series(np.arange(len(index)), index=index["img_name"].where(index["split"] == "train"))
    rows = row_of[folds["img_name"]].to_numpy()
    # No held-out cells to choose an epoch on: the folds chose it, and the last one is kept, like the student's.
    cfg = replace(cfg, epochs=epochs, select_best=False)
    backbone = teacher.model.backbone
    best, _ = _fit_and_predict(index, images, rows, None, out, teacher, name=f"{backbone} refit", cfg=cfg,
                               fingerprint=_fingerprint(teacher, "full", prepared, folds_csv))
    log.info("%s refit: kept epoch %d of %d, trained on all %d cells", backbone, best["epoch"], epochs, len(rows))
    return best


def _fit_and_predict(index: pd.DataFrame, images: np.ndarray, tr: np.ndarray, va: np.ndarray | None, out: Path,
                     teacher: Teacher, *, name: str, cfg: TrainConfig, fingerprint: dict
                     ) -> tuple[dict, pd.DataFrame | None]:
    """One model on cache rows `tr`, validated on `va` (None: no validation), through train_logged; writes oof.csv
    (for `va`), test.csv and hidden.csv. Returns the kept epoch's metrics and the OOF table (None without `va`)."""
    labels = index["label"].to_numpy(dtype=float)
    seed_everything(cfg.seed)
    model = teacher.model.create()
    norm = data_config(model)
    train_ds = CellDataset(images[tr], targets(labels[tr]), build_transform(True, teacher.aug, **norm), seed=cfg.seed)
    val_ds = None if va is None else eval_dataset(images[va], norm)
    out.mkdir(parents=True, exist_ok=True)
    log.info("%s: %d train / %d validation images, seed %d", name, len(tr), 0 if va is None else len(va), cfg.seed)

    best, model = train_logged(model, teacher.model.backbone, train_ds, val_ds,
                               None if va is None else labels[va].astype(int), LabelLoss(cfg.label_smoothing), cfg,
                               out, teacher.params, fingerprint)
    oof = None if va is None else write_predictions(model, images, index, va, out / "oof.csv", cfg, teacher.tta, norm)
    write_split_predictions(model, images, index, out, cfg, teacher.tta, norm)
    return best, oof
