"""The bar and the switches, scored on the labelled test set: `plain` trains the simplest competitor (one network on
all training cells), `ablate` one switch over the train stage's folds (CV, test, minutes), each with a paired test
(McNemar) against a reference run; `table` gathers the ablation rows for the report."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.lib.checkpoints import set_aside
from pipeline.lib.common import PipelineError
from pipeline.tools.compare import labels_by_name, paired, summary
from pipeline.lib.dataset import load_cache, split_rows
from pipeline.lib.engine import TrainConfig
from pipeline.lib.metrics import accuracy_se, binary_metrics
from pipeline.lib.layout import fold_dirs, fold_name
from pipeline.lib.teachers import Teacher, train_all, train_fold
from pipeline.lib.training import derived_seed, for_backbone, train_config

log = logging.getLogger(__name__)


def bench_plain(prepared: Path, out: Path, *, teacher: Teacher, cfg: TrainConfig, train_cells: int | None = None
                ) -> dict:
    """The bar every piece of machinery must clear: one network trained on all training cells exactly as the train
    stage trains it without folds (teachers.train_all: the stage's seed, the last epoch kept), always from scratch,
    scored without TTA on the labelled test set. `train_cells`: repeat the training cells up to that many, to time an
    epoch of a bigger data set (its score then means nothing new)."""
    index, _ = load_cache(prepared)
    tr, te = split_rows(index, "train"), split_rows(index, "test")
    if train_cells:
        tr = np.resize(tr, train_cells)  # cyclic repeat of the training rows
    if (out / "last.pt").is_file():
        set_aside(out / "last.pt", ["a benchmark always trains from scratch"])
    start = time.perf_counter()
    train_all(prepared, out, teacher, cfg=cfg, rows=tr)
    minutes = (time.perf_counter() - start) / 60
    test = pd.read_csv(out / "test.csv", dtype={"img_name": str})
    labels = labels_by_name(index)[test["img_name"]].to_numpy(int)
    m = binary_metrics(labels, test["prob"].to_numpy())
    se = accuracy_se(m["accuracy"], len(te))
    spec = teacher.model
    result = {"backbone": spec.backbone, "pretrained": spec.pretrained, "img_size": int(teacher.params["img_size"]),
              "epochs": cfg.epochs, "seed": cfg.seed, "train_images": len(tr), "test_images": len(te),
              "test_accuracy": m["accuracy"], "test_accuracy_se": se, "test_roc_auc": m["roc_auc"], "minutes": minutes}
    log.info("plain %s, %d epochs on %d cells at %d px: test accuracy %.4f ± %.4f (AUC %.4f) on %d cells in %.2f min",
             spec.backbone, cfg.epochs, len(tr), result["img_size"], m["accuracy"], se, m["roc_auc"], len(te), minutes)
    return result


def against(row: dict, run: Path, reference: Path | None, prepared: Path) -> dict:
    """Add the paired test of `run` against `reference` (a bench folder or a run's submission file) to `row`."""
    if reference is None:
        return row
    r = paired(run, reference, prepared)
    row.update(reference=str(reference), reference_accuracy=r["b"]["accuracy"], only_this=r["only_a"],
               only_reference=r["only_b"], mcnemar_p=r["mcnemar_p"])
    log.info("%s", summary(r))
    return row


def bench_ablate(prepared: Path, folds_csv: Path, out: Path, params: dict, name: str, sets: list[str],
                 reference: Path | None = None) -> dict:
    """One ablation row: the first of train.backbones on every fold of folds_csv with these params (the train stage's
    own train_fold and seeds; finished folds are reused, so a TTA-only change only re-predicts): OOF accuracy and
    AUC, the fold-averaged labelled-test accuracy (± binomial SE) and AUC with the configured TTA, minutes, and the
    paired test against `reference` (the base row's run folder, say)."""
    if params["folds"]["n"] == 0:
        raise PipelineError("bench ablate scores a switch by CV over the folds, and folds.n is 0: add --set folds.n=3 "
                            "(with its folds.csv from `dvc repro folds`), or score one model on all cells with "
                            "`python -m pipeline.tools.bench plain`.")
    backbone = params["train"]["backbones"][0]
    params = for_backbone(params, backbone)
    p, teacher = params["train"], Teacher.from_params(params, backbone)
    index, _ = load_cache(prepared)
    label = labels_by_name(index)
    start = time.perf_counter()
    for k in sorted(pd.read_csv(folds_csv)["fold"].unique()):
        train_fold(prepared, folds_csv, out / fold_name(int(k)), teacher, fold=int(k),
                   cfg=train_config(p, derived_seed(p["seed"], backbone, int(k))))
    minutes = (time.perf_counter() - start) / 60
    read = lambda f: pd.read_csv(f, dtype={"img_name": str})
    oof = pd.concat(read(d / "oof.csv") for d in fold_dirs(out, "oof.csv"))
    tests = [read(d / "test.csv") for d in fold_dirs(out, "test.csv")]
    test_prob = np.mean([t["prob_tta"].to_numpy() for t in tests], 0)
    cv = binary_metrics(label[oof["img_name"]].to_numpy(int), oof["prob_tta"].to_numpy())
    test = binary_metrics(label[tests[0]["img_name"]].to_numpy(int), test_prob)
    predictions = out.parent / "predictions" / f"{name}.csv"  # this row's own: a TTA-only row shares the run folder
    predictions.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"img_name": tests[0]["img_name"], "prob": test_prob}).to_csv(predictions, index=False,
                                                                               float_format="%.6f")
    row = {"name": name, "set": sets, "backbone": backbone, "seed": p["seed"], "cv_accuracy": cv["accuracy"],
           "cv_accuracy_se": accuracy_se(cv["accuracy"], len(oof)), "cv_roc_auc": cv["roc_auc"],
           "test_accuracy": test["accuracy"],
           "test_accuracy_se": accuracy_se(test["accuracy"], len(test_prob)), "test_roc_auc": test["roc_auc"],
           "minutes": minutes}
    row = against(row, predictions, reference, prepared)
    with open(out.parent / "ablations.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    log.info("| %s | %s | %.3f ± %.3f (%.3f) | %.3f ± %.3f (%.3f) | %.1f |", name, " ".join(sets) or "(base)",
             cv["accuracy"], row["cv_accuracy_se"], cv["roc_auc"], test["accuracy"], row["test_accuracy_se"],
             test["roc_auc"], minutes)
    return row


def ablation_table(rows_jsonl: Path, out_csv: Path, note: str) -> pd.DataFrame:
    """The ablation rows (the last of each name) as the CSV the report shows, `note` (the shared configuration and the
    machine) in its # header lines."""
    rows = [json.loads(line) for line in rows_jsonl.read_text().splitlines() if line.strip()]
    table = pd.DataFrame(list({r["name"]: r for r in rows}.values()))
    table["set"] = table["set"].map(lambda s: " ".join(s) or "(the base configuration)")
    cols = ["name", "set", "seed", "cv_accuracy", "cv_accuracy_se", "cv_roc_auc", "test_accuracy", "test_accuracy_se",
            "test_roc_auc", "minutes"]
    header = "".join(f"# {line}\n" for line in note.splitlines())
    out_csv.write_text(header + table[cols].to_csv(index=False, float_format="%.4f"))
    return table[cols]
