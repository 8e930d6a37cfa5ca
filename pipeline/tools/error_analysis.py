"""Error analysis over ablation runs: per cell, how many runs got it wrong (the cells every run misses bound what any
of them can score)."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from pipeline.lib.common import PipelineError
from pipeline.tools.compare import labels_by_name
from pipeline.lib.dataset import load_cache
from pipeline.lib.layout import fold_dirs


def run_errors(prepared: Path, ablate_dir: Path, runs: list[str] | None = None) -> tuple[pd.DataFrame, list[str]]:
    """Per training (out-of-fold) and labelled-test cell: in how many of the ablation runs (all under ablate_dir, or
    `runs`) it was wrong at 0.5, each run's test call its folds' mean probability; and one summary line per split.
    The single-view `prob` is read: a TTA-only row (--models) rewrites a run's `prob_tta`, never its `prob`."""
    index, _ = load_cache(prepared)
    label = labels_by_name(index)
    read = lambda f: pd.read_csv(f, dtype={"img_name": str}).drop_duplicates("img_name").set_index("img_name")["prob"]
    names = runs or sorted(d.name for d in ablate_dir.iterdir() if fold_dirs(d, "test.csv"))
    wrong = {}
    for name in names:
        d = ablate_dir / name
        if not fold_dirs(d, "oof.csv") or not fold_dirs(d, "test.csv"):
            raise PipelineError(f"{d} holds no finished fold (fold*/oof.csv and test.csv): run `python -m pipeline.tools.bench "
                                f"ablate --name {name}` first, or leave it out of --runs.")
        oof = pd.concat(read(f / "oof.csv") for f in fold_dirs(d, "oof.csv"))
        test = pd.concat([read(f / "test.csv") for f in fold_dirs(d, "test.csv")], axis=1).mean(axis=1)
        wrong[name] = pd.concat([(p >= 0.5) != (label[p.index] == 1) for p in (oof, test)],
                                keys=["cv", "test"], names=["split", "img_name"])
    table = pd.DataFrame(wrong)  # a run whose folds.csv left a cell out did not score it: NaN, not counted
    out = pd.DataFrame({"label": label[table.index.get_level_values("img_name")].to_numpy(),
                        "runs_wrong": table.sum(axis=1).astype(int), "runs": table.notna().sum(axis=1)},
                       index=table.index)
    summary = []
    for split, rows in out.groupby(level="split"):
        always = int((rows["runs_wrong"] == len(names)).sum())
        summary.append(f"{split}: {always} of {len(rows)} cells wrong in all {len(names)} runs "
                       f"({int((rows['runs_wrong'] > 0).sum())} in at least one): each of these runs, and their mean, "
                       f"scores at most {(len(rows) - always) / len(rows):.3f} here")
    return out.sort_values("runs_wrong", ascending=False), summary
