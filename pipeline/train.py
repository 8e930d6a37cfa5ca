"""Stage `train`: train one timm backbone on one fold; write its checkpoint, metrics, and OOF/test/hidden probabilities."""
from __future__ import annotations

import argparse
import logging
import zlib
from dataclasses import fields
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline.common import PipelineError, load_params, run_main, seed_everything
from pipeline.dataset import CellDataset, load_cache, split_rows, targets
from pipeline.engine import TrainConfig, fit, predict, resolve_device, resumable
from pipeline.losses import LabelLoss
from pipeline.models import create_model, data_config, load_checkpoint, save_checkpoint
from pipeline.transforms import AugParams, build_transform
from pipeline.tta import expand_views

log = logging.getLogger(__name__)


def train_config(p: dict, seed: int, **overrides) -> TrainConfig:
    """TrainConfig from a params section (train: or distill:), keeping only the keys it knows."""
    known = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{**{k: v for k, v in p.items() if k in known}, "seed": seed, **overrides})


def derived_seed(seed: int, *parts) -> int:
    """A stable per-(backbone, fold) seed (Python's hash() is salted per process)."""
    return (seed + zlib.crc32("/".join(map(str, parts)).encode())) % 2**31


def tta_views(tta: dict) -> list[str]:
    """The expanded tta.views of params.yaml, or a PipelineError naming the bad view."""
    try:
        return expand_views(tta["views"])
    except ValueError as e:
        raise PipelineError(str(e)) from None


def write_predictions(model, images, index, rows, out_csv: Path, cfg: TrainConfig, views: list[str], crop_scale: float,
                      transform) -> pd.DataFrame:
    """Write and return img_name, prob (plain) and prob_tta (mean over the TTA views) for the given cache rows."""
    names = ["identity", *[v for v in views if v != "identity"]]
    ds = CellDataset(images[rows], targets(np.zeros(len(rows))), transform)
    probs = predict(model, ds, cfg, resolve_device(cfg.device), names, crop_scale, desc=out_csv.stem)
    df = pd.DataFrame({"img_name": index["img_name"].to_numpy()[rows], "prob": probs[:, 0],
                       "prob_tta": probs[:, [names.index(v) for v in views]].mean(1)})
    df.to_csv(out_csv, index=False, float_format="%.6f")
    return df


def train_logged(model, arch: str, train_ds, val_ds, val_labels, loss_fn, cfg: TrainConfig, out: Path,
                 params: dict) -> tuple[dict, torch.nn.Module]:
    """fit() with dvclive curves in out/live and the kept checkpoint in out/checkpoint.pt; returns the kept
    epoch's metrics and the model rebuilt from that checkpoint (teachers and student alike)."""
    from dvclive import Live  # imported late: it is slow to import and only the stages need it

    ckpt = out / "checkpoint.pt"
    # A fresh run starts fresh curves; a resumed or finished one keeps its (persisted) curves.
    with Live(dir=str(out / "live"), resume=resumable(out, cfg), dvcyaml=None, save_dvc_exp=False) as live:
        save = lambda m, epoch, metric: save_checkpoint(ckpt, m, arch=arch, params=params, epoch=epoch, metric=metric)
        best = fit(model, train_ds, val_ds, val_labels, loss_fn, cfg, out, live, save)
        for k, v in best.items():
            live.summary[k] = v
    model, _ = load_checkpoint(ckpt, resolve_device(cfg.device))
    return best, model


def train_fold(prepared: Path, folds_csv: Path, out: Path, *, backbone: str, fold: int, cfg: TrainConfig,
               aug: AugParams, pretrained: bool, weights_dir: str, drop_rate: float, views: list[str],
               crop_scale: float, params: dict) -> dict:
    index, images = load_cache(prepared)
    folds = pd.read_csv(folds_csv, dtype={"img_name": str})
    if fold not in set(folds["fold"]):
        raise PipelineError(f"Fold {fold} is not in {folds_csv} (folds {sorted(set(folds['fold']))}); make "
                            "train.folds list only folds below folds.n.")
    row_of = pd.Series(np.arange(len(index)), index=index["img_name"].where(index["split"] == "train"))
    tr, va = (row_of[folds.loc[m, "img_name"]].to_numpy() for m in (folds["fold"] != fold, folds["fold"] == fold))
    labels = index["label"].to_numpy(dtype=float)
    seed_everything(cfg.seed)
    model = create_model(backbone, pretrained=pretrained, weights_dir=weights_dir, drop_rate=drop_rate)
    norm = data_config(model)
    train_tf = build_transform(True, aug, **norm)
    eval_tf = build_transform(False, aug, **norm)
    train_ds = CellDataset(images[tr], targets(labels[tr]), train_tf, seed=cfg.seed)
    val_ds = CellDataset(images[va], targets(labels[va]), eval_tf)
    out.mkdir(parents=True, exist_ok=True)
    log.info("%s fold %d: %d train / %d validation images, seed %d", backbone, fold, len(tr), len(va), cfg.seed)

    best, model = train_logged(model, backbone, train_ds, val_ds, labels[va].astype(int),
                               LabelLoss(cfg.label_smoothing), cfg, out, params)
    oof = write_predictions(model, images, index, va, out / "oof.csv", cfg, views, crop_scale, eval_tf)
    for split in ("test", "hidden"):
        write_predictions(model, images, index, split_rows(index, split), out / f"{split}.csv", cfg, views,
                          crop_scale, eval_tf)
    acc = ((oof["prob"].to_numpy() >= 0.5) == labels[va]).mean()
    log.info("%s fold %d: kept epoch %d, OOF accuracy %.4f", backbone, fold, best["epoch"], acc)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backbone", required=True)
    parser.add_argument("--fold", type=int, required=True)
    parser.add_argument("--prepared", required=True, help="the prepare stage's folder")
    parser.add_argument("--folds", required=True, help="the folds CSV")
    parser.add_argument("--out", required=True, help="this (backbone, fold)'s folder")
    args = parser.parse_args()
    params = load_params()
    p, tta = params["train"], params["tta"]
    cfg = train_config(p, derived_seed(p["seed"], args.backbone, args.fold))
    views = tta_views(tta)
    train_fold(Path(args.prepared), Path(args.folds), Path(args.out), backbone=args.backbone, fold=args.fold, cfg=cfg,
               aug=AugParams(**params["augment"]), pretrained=p["pretrained"], weights_dir=p["weights_dir"],
               drop_rate=p["drop_rate"], views=views, crop_scale=tta["crop_scale"],
               params={"train": p, "augment": params["augment"], "img_size": params["data"]["img_size"]})


if __name__ == "__main__":
    run_main(main)
