"""The teachers of one backbone: a fold model, the refit (train.refit) or the all-cells model (folds.n 0), each
trained through training.train_model; the train stage's work, which `pipeline.tools.bench` repeats with other params."""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.lib import checkpoints
from pipeline.lib.common import PipelineError
from pipeline.lib.dataset import load_cache, split_rows, targets
from pipeline.lib.engine import TrainConfig
from pipeline.lib.losses import LabelLoss
from pipeline.lib.models import ModelSpec
from pipeline.lib.training import for_backbone, train_model
from pipeline.lib.transforms import AugParams
from pipeline.lib.tta import TTASpec

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


def _fingerprint(teacher: Teacher, fold: int | str, prepared: Path, folds_csv: Path | None) -> dict:
    m = teacher.model
    learned = teacher.learned
    if folds_csv is None:  # the all-cells model: no folds, and no validation for train.patience to act on
        learned = {k: v for k, v in learned.items() if not k.startswith("folds.") and k != "train.patience"}
    return checkpoints.model_fingerprint({**learned, "model.backbone": m.backbone, "model.fold": fold}, prepared,
                                         checkpoints.weights_digest(m.backbone, m.pretrained, m.weights_dir), folds_csv)


def _train(prepared: Path, out: Path, teacher: Teacher, rows: np.ndarray, val_rows: np.ndarray | None, *,
           name: str, cfg: TrainConfig, fingerprint: dict) -> tuple[dict, dict]:
    index, images = load_cache(prepared)
    labels = index["label"].to_numpy(dtype=float)
    best, _, tables = train_model(teacher.model, images, index, rows, targets(labels[rows]), out, aug=teacher.aug,
                                  tta=teacher.tta, loss_fn=LabelLoss(cfg.label_smoothing), cfg=cfg,
                                  record=teacher.params, fingerprint=fingerprint, val_rows=val_rows, name=name)
    return best, tables


def _fold_rows(prepared: Path, folds_csv: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.Series]:
    index, _ = load_cache(prepared)
    folds = pd.read_csv(folds_csv, dtype={"img_name": str})
    row_of = pd.Series(np.arange(len(index)), index=index["img_name"].where(index["split"] == "train"))
    return index, folds, row_of


def train_fold(prepared: Path, folds_csv: Path, out: Path, teacher: Teacher, *, fold: int, cfg: TrainConfig) -> dict:
    """Train (or resume, or reuse) one (backbone, fold) model, keeping its best validation epoch; its predictions."""
    index, folds, row_of = _fold_rows(prepared, folds_csv)
    if fold not in set(folds["fold"]):
        raise PipelineError(f"Fold {fold} is not in {folds_csv} (folds {sorted(set(folds['fold']))}).")
    tr, va = (row_of[folds.loc[m, "img_name"]].to_numpy() for m in (folds["fold"] != fold, folds["fold"] == fold))
    backbone = teacher.model.backbone
    best, tables = _train(prepared, out, teacher, tr, va, name=f"{backbone} fold {fold}", cfg=cfg,
                          fingerprint=_fingerprint(teacher, fold, prepared, folds_csv))
    acc = ((tables["oof"]["prob"].to_numpy() >= 0.5) == index["label"].to_numpy(dtype=float)[va]).mean()
    log.info("%s fold %d: kept epoch %d, OOF accuracy %.4f", backbone, fold, best["epoch"], acc)
    return best


def train_full(prepared: Path, folds_csv: Path, out: Path, teacher: Teacher, *, epochs: int, cfg: TrainConfig) -> dict:
    """The refit (train.refit): train (or resume, or reuse) one model on every cell of the folds for `epochs`,
    keeping the last epoch, and write its test/hidden predictions."""
    _, folds, row_of = _fold_rows(prepared, folds_csv)
    rows = row_of[folds["img_name"]].to_numpy()
    # No held-out cells to choose an epoch on: the folds chose it, and the last one is kept, like the student's.
    cfg = replace(cfg, epochs=epochs, select_best=False)
    backbone = teacher.model.backbone
    best, _ = _train(prepared, out, teacher, rows, None, name=f"{backbone} refit", cfg=cfg,
                     fingerprint=_fingerprint(teacher, "full", prepared, folds_csv))
    log.info("%s refit: kept epoch %d of %d, trained on all %d cells", backbone, best["epoch"], epochs, len(rows))
    return best


def train_all(prepared: Path, out: Path, teacher: Teacher, *, cfg: TrainConfig, rows: np.ndarray | None = None
              ) -> dict:
    """The all-cells model (folds.n 0): train (or resume, or reuse) one model on every training cell for cfg.epochs,
    keeping the last epoch (no held-out cells, so train.patience has nothing to act on), and write its test/hidden
    predictions. `rows`: other cache rows to train on (`bench plain --train-cells`)."""
    index, _ = load_cache(prepared)
    rows = split_rows(index, "train") if rows is None else rows
    cfg = replace(cfg, select_best=False, patience=1)  # patience means nothing here: constant, not in the fingerprint
    backbone = teacher.model.backbone
    best, _ = _train(prepared, out, teacher, rows, None, name=f"{backbone} on all cells", cfg=cfg,
                     fingerprint=_fingerprint(teacher, "all", prepared, None))
    log.info("%s: kept epoch %d of %d, trained on all %d training cells", backbone, best["epoch"], cfg.epochs,
             len(rows))
    return best
