"""Stage `train`: one timm backbone on every fold of folds.csv (and all cells, train.refit); checkpoints, metrics, probabilities."""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import distributed as ddp
from pipeline import fingerprint as fp
from pipeline.common import PipelineError, run_main, seed_everything
from pipeline.dataset import CellDataset, load_cache, targets
from pipeline.engine import TrainConfig
from pipeline.losses import LabelLoss
from pipeline.models import create_model, data_config, read_checkpoint, weights_digest
from pipeline.params import load_params
from pipeline.transforms import AugParams, build_transform
from pipeline.tta import expand_views
from pipeline.workflow import (data_digests, derived_seed, for_backbone, start_processes, train_config, train_logged,
                               write_predictions, write_split_predictions)

log = logging.getLogger(__name__)


def train_fold(prepared: Path, folds_csv: Path, out: Path, *, backbone: str, fold: int, cfg: TrainConfig,
               aug: AugParams, pretrained: bool, weights_dir: str, drop_rate: float, views: list[str],
               crop_scale: float, params: dict, learned: dict | None = None, drop_path_rate: float = 0.0) -> dict:
    """Train (or resume, or reuse) one (backbone, fold) model and write its predictions.

    `learned` is the flat map of params that shape the weights (pipeline.fingerprint.learned_params)."""
    index, images = load_cache(prepared)
    folds = pd.read_csv(folds_csv, dtype={"img_name": str})
    if fold not in set(folds["fold"]):
        raise PipelineError(f"Fold {fold} is not in {folds_csv} (folds {sorted(set(folds['fold']))}).")
    row_of = pd.Series(np.arange(len(index)), index=index["img_name"].where(index["split"] == "train"))
    tr, va = (row_of[folds.loc[m, "img_name"]].to_numpy() for m in (folds["fold"] != fold, folds["fold"] == fold))
    fingerprint = fp.make({**(learned or {}), "model.backbone": backbone, "model.fold": fold},
                          {**data_digests(prepared, folds_csv),
                           "weights": weights_digest(backbone, pretrained, weights_dir)})
    best, oof = _fit_and_predict(index, images, tr, va, out, name=f"{backbone} fold {fold}", backbone=backbone,
                                 cfg=cfg, aug=aug, pretrained=pretrained, weights_dir=weights_dir, drop_rate=drop_rate,
                                 drop_path_rate=drop_path_rate, views=views, crop_scale=crop_scale, params=params,
                                 fingerprint=fingerprint)
    acc = ((oof["prob"].to_numpy() >= 0.5) == index["label"].to_numpy(dtype=float)[va]).mean()
    log.info("%s fold %d: kept epoch %d, OOF accuracy %.4f", backbone, fold, best["epoch"], acc)
    return best


def refit_epochs(backbone_dir: Path, folds: list[int]) -> int:
    """The refit's epochs: the mean of the epochs the folds kept (from their checkpoints), rounded half up."""
    kept = []
    for k in folds:
        ckpt = backbone_dir / f"fold{k}" / "checkpoint.pt"
        if not ckpt.is_file():
            raise PipelineError(f"{ckpt} is missing, but train.refit needs every fold's kept epoch: train all folds "
                                f"first (`dvc repro train@{backbone_dir.name}`, or pipeline.train without --fold).")
        kept.append(int(read_checkpoint(ckpt, mmap=True)["epoch"]))
    n = max(1, int(np.floor(np.mean(kept) + 0.5)))  # half up: round() would take 2.5 to 2
    log.info("%s refit: %d epochs, the rounded mean of the folds' kept epochs %s", backbone_dir.name, n, kept)
    return n


def train_full(prepared: Path, folds_csv: Path, out: Path, *, backbone: str, epochs: int, cfg: TrainConfig,
               aug: AugParams, pretrained: bool, weights_dir: str, drop_rate: float, views: list[str],
               crop_scale: float, params: dict, learned: dict | None = None, drop_path_rate: float = 0.0) -> dict:
    """The refit (train.refit): train (or resume, or reuse) one model on every cell of the folds for `epochs`,
    keeping the last epoch, and write its test/hidden predictions; `learned` as in train_fold."""
    index, images = load_cache(prepared)
    folds = pd.read_csv(folds_csv, dtype={"img_name": str})
    row_of = pd.Series(np.arange(len(index)), index=index["img_name"].where(index["split"] == "train"))
    rows = row_of[folds["img_name"]].to_numpy()
    # No held-out cells to choose an epoch on: the folds chose it, and the last one is kept, like the student's.
    cfg = replace(cfg, epochs=epochs, select_best=False)
    fingerprint = fp.make({**(learned or {}), "model.backbone": backbone, "model.fold": "full"},
                          {**data_digests(prepared, folds_csv),
                           "weights": weights_digest(backbone, pretrained, weights_dir)})
    best, _ = _fit_and_predict(index, images, rows, None, out, name=f"{backbone} refit", backbone=backbone, cfg=cfg,
                               aug=aug, pretrained=pretrained, weights_dir=weights_dir, drop_rate=drop_rate,
                               drop_path_rate=drop_path_rate, views=views, crop_scale=crop_scale, params=params,
                               fingerprint=fingerprint)
    log.info("%s refit: kept epoch %d of %d, trained on all %d cells", backbone, best["epoch"], epochs, len(rows))
    return best


def _fit_and_predict(index: pd.DataFrame, images: np.ndarray, tr: np.ndarray, va: np.ndarray | None, out: Path, *,
                     name: str, backbone: str, cfg: TrainConfig, aug: AugParams, pretrained: bool, weights_dir: str,
                     drop_rate: float, drop_path_rate: float, views: list[str], crop_scale: float, params: dict,
                     fingerprint: dict) -> tuple[dict, pd.DataFrame | None]:
    """One model on cache rows `tr`, validated on `va` (None: no validation), through train_logged; writes oof.csv
    (for `va`), test.csv and hidden.csv. Returns the kept epoch's metrics and the OOF table (None without `va`)."""
    labels = index["label"].to_numpy(dtype=float)
    seed_everything(cfg.seed)
    model = create_model(backbone, pretrained=pretrained, weights_dir=weights_dir, drop_rate=drop_rate,
                         drop_path_rate=drop_path_rate)
    norm = data_config(model)
    train_tf = build_transform(True, aug, **norm)
    eval_tf = build_transform(False, aug, **norm)
    train_ds = CellDataset(images[tr], targets(labels[tr]), train_tf, seed=cfg.seed)
    val_ds = None if va is None else CellDataset(images[va], targets(labels[va]), eval_tf)
    out.mkdir(parents=True, exist_ok=True)
    log.info("%s: %d train / %d validation images, seed %d", name, len(tr), 0 if va is None else len(va), cfg.seed)

    best, model = train_logged(model, backbone, train_ds, val_ds, None if va is None else labels[va].astype(int),
                               LabelLoss(cfg.label_smoothing), cfg, out, params, fingerprint)
    oof = None if va is None else write_predictions(model, images, index, va, out / "oof.csv", cfg, views,
                                                    crop_scale, eval_tf)
    write_split_predictions(model, images, index, out, cfg, views, crop_scale, eval_tf)
    return best, oof


def remove_stale_folds(out: Path, folds: list[int], refit: bool = False) -> None:
    """The backbone's folder persists between runs (for last.pt): drop folders of folds that no longer exist, and
    the refit model's folder (full/) when train.refit is off."""
    for d in sorted(out.glob("fold*")):
        if d.is_dir() and d.name not in {f"fold{k}" for k in folds}:
            log.info("Removing %s: folds.csv has no fold %s now", d, d.name[4:])
            shutil.rmtree(d)
    if not refit and (out / "full").is_dir():
        log.info("Removing %s: train.refit is off", out / "full")
        shutil.rmtree(out / "full")


def model_kwargs(params: dict, backbone: str) -> dict:
    """The keyword arguments train_fold and train_full take from params.yaml, for one backbone."""
    params = for_backbone(params, backbone)  # its own lr, and no other model's in its fingerprint
    p, tta = params["train"], params["tta"]
    return dict(backbone=backbone, aug=AugParams(**params["augment"]), pretrained=p["pretrained"],
                weights_dir=p["weights_dir"], drop_rate=p["drop_rate"], views=expand_views(tta["views"]),
                crop_scale=tta["crop_scale"], learned=fp.learned_params(params, fp.TEACHER_PARAMS),
                drop_path_rate=p["drop_path_rate"],
                params={"train": p, "augment": params["augment"], "img_size": params["data"]["img_size"]})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backbone", required=True)
    parser.add_argument("--prepared", required=True, help="the prepare stage's folder")
    parser.add_argument("--folds", required=True, help="the folds CSV")
    parser.add_argument("--out", required=True, help="this backbone's folder (fold<k>/ inside)")
    parser.add_argument("--fold", type=int, action="append",
                        help="train only this fold (repeatable; outside DVC, e.g. to try one fold first)")
    args = parser.parse_args()
    params = for_backbone(load_params(), args.backbone)
    p = params["train"]
    if start_processes("pipeline.train", p):
        return
    folds_csv, out = Path(args.folds), Path(args.out)
    if not folds_csv.is_file():
        raise PipelineError(f"{folds_csv} is missing: run `dvc repro folds` first.")
    all_folds = sorted(int(k) for k in pd.read_csv(folds_csv)["fold"].unique())
    chosen = args.fold or all_folds
    if not args.fold and ddp.is_main():
        remove_stale_folds(out, all_folds, refit=p["refit"])
    common = model_kwargs(params, args.backbone)
    seconds = {}
    for k in chosen:
        start = time.perf_counter()
        train_fold(Path(args.prepared), folds_csv, out / f"fold{k}", fold=k,
                   cfg=train_config(p, derived_seed(p["seed"], args.backbone, k)), **common)
        seconds[f"fold{k}"] = round(time.perf_counter() - start, 1)
    if p["refit"] and args.fold:
        log.info("train.refit: the refit model is trained by a run over every fold (without --fold)")
    elif p["refit"]:
        start = time.perf_counter()
        train_full(Path(args.prepared), folds_csv, out / "full", epochs=refit_epochs(out, all_folds),
                   cfg=train_config(p, derived_seed(p["seed"], args.backbone, "full")), **common)
        seconds["full"] = round(time.perf_counter() - start, 1)
    # This run's wall time per model (training, or only predicting when reused), for the headline metrics.
    if ddp.is_main():
        (out / "timing.json").write_text(json.dumps({"seconds": seconds}, indent=2))
    ddp.shutdown()


if __name__ == "__main__":
    run_main(main)
