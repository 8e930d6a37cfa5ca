"""Stage `train`: one timm backbone on every fold of folds.csv (and all cells, train.refit), or once on all training
cells (folds.n 0); checkpoints, curves, probabilities."""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.lib import distributed as ddp
from pipeline.lib.checkpoints import read_checkpoint
from pipeline.lib.common import PipelineError, run_main
from pipeline.lib.layout import FULL, fold_dirs, fold_name
from pipeline.lib.params import load_params
from pipeline.lib.teachers import Teacher, train_all, train_fold, train_full
from pipeline.lib.training import derived_seed, for_backbone, start_processes, train_config

log = logging.getLogger(__name__)


def refit_epochs(backbone_dir: Path, folds: list[int]) -> int:
    """The refit's epochs: the mean of the epochs the folds kept (from their checkpoints), rounded half up."""
    kept = []
    for k in folds:
        ckpt = backbone_dir / fold_name(k) / "checkpoint.pt"
        if not ckpt.is_file():
            raise PipelineError(f"{ckpt} is missing, but train.refit needs every fold's kept epoch: train all folds "
                                f"first (`dvc repro train@{backbone_dir.name}`, or pipeline.train without --fold).")
        kept.append(int(read_checkpoint(ckpt, mmap=True)["epoch"]))
    n = max(1, int(np.floor(np.mean(kept) + 0.5)))  # half up: round() would take 2.5 to 2
    log.info("%s refit: %d epochs, the rounded mean of the folds' kept epochs %s", backbone_dir.name, n, kept)
    return n


def remove_stale_folds(out: Path, folds: list[int], refit: bool = False) -> None:
    """The backbone's folder persists between runs (for last.pt): drop folders of folds that no longer exist, and
    the refit model's folder (full/) when train.refit is off."""
    for d in fold_dirs(out):
        if d.name not in {fold_name(k) for k in folds}:
            log.info("Removing %s: folds.csv has no fold %s now", d, d.name[4:])
            shutil.rmtree(d)
    if not refit and (out / FULL).is_dir():
        log.info("Removing %s: train.refit is off", out / FULL)
        shutil.rmtree(out / FULL)


def announce(p: dict, backbone: str, i: int, count: int, what: str) -> None:
    """Which model of how many starts: a person follows a long run by these lines."""
    if ddp.is_main():
        names = list(p["backbones"])
        where = f"backbone {names.index(backbone) + 1} of {len(names)}" if backbone in names else "backbone"
        log.info("Model %d of %d for %s (%s): %s", i, count, backbone, where, what)


def train_without_folds(prepared: Path, out: Path, teacher: Teacher, p: dict, *, backbone: str,
                        fold: list[int] | None) -> dict[str, float]:
    """folds.n 0: one model on every training cell (full/), whatever folds.csv holds; fold folders are removed."""
    if fold:
        raise PipelineError("--fold: folds.n is 0 (no cross-validation), so there are no folds to train; set folds.n "
                            "to 2 or more in params.yaml, or leave out --fold.")
    if ddp.is_main():
        remove_stale_folds(out, [], refit=True)
    announce(p, backbone, 1, 1, "on all training cells")
    start = time.perf_counter()
    train_all(prepared, out / FULL, teacher, cfg=train_config(p, derived_seed(p["seed"], backbone, "full")))
    return {"full": round(time.perf_counter() - start, 1)}


def train_folds(prepared: Path, folds_csv: Path, out: Path, teacher: Teacher, p: dict, *, backbone: str,
                fold: list[int] | None) -> dict[str, float]:
    """Every fold of folds.csv (or the --fold ones), then the refit model when train.refit is on; seconds per model."""
    if not folds_csv.is_file():
        raise PipelineError(f"{folds_csv} is missing: run `dvc repro folds` first.")
    all_folds = sorted(int(k) for k in pd.read_csv(folds_csv)["fold"].unique())
    if not fold and ddp.is_main():
        remove_stale_folds(out, all_folds, refit=p["refit"])
    seconds, todo = {}, fold or all_folds
    count = len(todo) + bool(p["refit"] and not fold)
    for i, k in enumerate(todo, 1):
        announce(p, backbone, i, count, f"fold {k} of {len(all_folds)}")
        start = time.perf_counter()
        train_fold(prepared, folds_csv, out / fold_name(k), teacher, fold=k,
                   cfg=train_config(p, derived_seed(p["seed"], backbone, k)))
        seconds[f"fold{k}"] = round(time.perf_counter() - start, 1)
    if p["refit"] and fold:
        log.info("train.refit: the refit model is trained by a run over every fold (without --fold)")
    elif p["refit"]:
        announce(p, backbone, count, count, "the refit on all training cells")
        start = time.perf_counter()
        train_full(prepared, folds_csv, out / FULL, teacher, epochs=refit_epochs(out, all_folds),
                   cfg=train_config(p, derived_seed(p["seed"], backbone, "full")))
        seconds["full"] = round(time.perf_counter() - start, 1)
    return seconds


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
    teacher = Teacher.from_params(params, args.backbone)
    if params["folds"]["n"] == 0:
        seconds = train_without_folds(Path(args.prepared), out, teacher, p, backbone=args.backbone, fold=args.fold)
    else:
        seconds = train_folds(Path(args.prepared), folds_csv, out, teacher, p, backbone=args.backbone, fold=args.fold)
    # This run's wall time per model (training, or only predicting when reused), for the headline metrics.
    if ddp.is_main():
        (out / "timing.json").write_text(json.dumps({"seconds": seconds}, indent=2))
    ddp.shutdown()


if __name__ == "__main__":
    run_main(main)
