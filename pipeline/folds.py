"""Stage `folds`: assign every training image a cross-validation fold, stratified and grouped by slide."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from pipeline.lib.common import PipelineError, run_main
from pipeline.lib.params import load_params

log = logging.getLogger(__name__)


def make_folds(index: pd.DataFrame, *, n: int, group_by: str, seed: int) -> pd.DataFrame:
    """Return img_name,label,group,fold for the train split; with group_by=patient no slide spans two folds. n 0 (no
    cross-validation): every cell's fold is -1, none."""
    train = index[index["split"] == "train"].reset_index(drop=True)
    y = train["label"].astype(int).to_numpy()
    if n == 0:
        log.info("folds.n 0: no cross-validation; each backbone trains once on all %d training cells", len(train))
        return train[["img_name", "label", "group"]].assign(label=y, fold=-1)
    if group_by == "patient":
        n_groups = train["group"].nunique()
        if n_groups < n:
            raise PipelineError(f"folds.n={n} but the training images come from only {n_groups} slides; lower "
                                "folds.n or set folds.group_by: none.")
        splits = StratifiedGroupKFold(n, shuffle=True, random_state=seed).split(train, y, train["group"])
    elif group_by == "none":
        smallest = int(np.bincount(y, minlength=2).min())
        if smallest < n:
            raise PipelineError(f"folds.n={n} but one class has only {smallest} training images; lower folds.n.")
        splits = StratifiedKFold(n, shuffle=True, random_state=seed).split(train, y)
    else:
        raise PipelineError(f"folds.group_by is {group_by!r}; use `patient` or `none`.")
    fold = np.full(len(train), -1)
    for k, (_, val) in enumerate(splits):
        fold[val] = k
    out = train[["img_name", "label", "group"]].assign(label=y, fold=fold)
    rate = y.mean()
    for k, part in out.groupby("fold"):
        log.info("fold %d: %5d images, %3d slides, positive rate %.3f (all: %.3f)", k, len(part),
                 part["group"].nunique(), part["label"].mean(), rate)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--index", required=True, help="the prepare stage's index.csv")
    parser.add_argument("--out", required=True, help="the folds CSV to write")
    args = parser.parse_args()
    f = load_params()["folds"]
    folds = make_folds(pd.read_csv(args.index), n=f["n"], group_by=f["group_by"], seed=f["seed"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    folds.to_csv(args.out, index=False)


if __name__ == "__main__":
    run_main(main)
