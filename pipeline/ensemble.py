"""Stage `ensemble`: gather each backbone's folds (and refit model), blend the backbones on OOF, score on OOF and test;
without folds (folds.n 0), the all-cells models blended with equal weights at 0.5."""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.lib.blend import blend, choose_blend, choose_threshold
from pipeline.lib.common import PipelineError, labelled_test_seen, run_main, write_text_whole, written_whole
from pipeline.lib.layout import fold_dir, full_dir
from pipeline.lib.metrics import binary_metrics
from pipeline.lib.params import load_params

log = logging.getLogger(__name__)
SPLITS = ("oof", "test", "hidden")


def gather(models: Path, backbones: list[str], folds: pd.DataFrame, index: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Per split, a table with img_name (and label) and a `<backbone>` / `<backbone>_tta` column per backbone.

    OOF comes from the fold that held each image out; test/hidden are averaged over the fold models."""
    names = {"oof": folds[["img_name", "label", "fold"]],
             "test": index.loc[index["split"] == "test", ["img_name", "label"]],
             "hidden": index.loc[index["split"] == "hidden", ["img_name"]]}
    out = {s: t.reset_index(drop=True).copy() for s, t in names.items()}
    n_folds = folds["fold"].nunique()
    for b in backbones:
        for split in SPLITS:
            files = [fold_dir(models, b, k) / f"{split}.csv" for k in range(n_folds)]
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise PipelineError(f"{b}: missing {', '.join(missing)}; train every fold "
                                    f"(run `dvc repro train@{b}`).")
            parts = [pd.read_csv(f, dtype={"img_name": str}) for f in files]
            if split == "oof":
                p = pd.concat(parts).set_index("img_name")
                if p.index.duplicated().any() or set(p.index) != set(out[split]["img_name"]):
                    raise PipelineError(f"{b}: the OOF files do not cover each training image exactly once; "
                                        f"re-run its train stage (`dvc repro -f train@{b}`).")
            else:
                p = pd.concat(parts).groupby("img_name")[["prob", "prob_tta"]].mean()
            out[split][b] = out[split]["img_name"].map(p["prob"]).to_numpy()
            out[split][f"{b}_tta"] = out[split]["img_name"].map(p["prob_tta"]).to_numpy()
    return out


def use_refit(models: Path, backbones: list[str], tables: dict[str, pd.DataFrame]) -> list[str]:
    """Put each refit model's test/hidden predictions (`<backbone>/full/`) in place of its fold average; returns
    the backbones that have one. OOF stays from the folds: the refit model saw every training cell."""
    used = []
    for b in backbones:
        refit_dir = full_dir(models, b)
        files = {split: refit_dir / f"{split}.csv" for split in ("test", "hidden")}
        if not all(f.is_file() for f in files.values()):
            log.warning("train.refit is on but %s has no refit predictions in %s: its test/hidden stay the fold "
                        "average (run `dvc repro train@%s`)", b, files["test"].parent, b)
            continue
        for split, f in files.items():
            p = pd.read_csv(f, dtype={"img_name": str}).groupby("img_name")[["prob", "prob_tta"]].mean()
            t = tables[split]
            for col, src in ((b, "prob"), (f"{b}_tta", "prob_tta")):
                t[col] = t["img_name"].map(p[src]).to_numpy()
            if t[b].isna().any():
                raise PipelineError(f"{f} has no prediction for {int(t[b].isna().sum())} {split} images; re-run "
                                    f"`dvc repro -f train@{b}`.")
        used.append(b)
    return used


def refit_report(models: Path, used: list[str], fold_average: pd.DataFrame, refit: pd.DataFrame,
                 thresholds: dict[str, float]) -> dict:
    """Test accuracy and ROC AUC of the fold average against the refit model, per refit backbone and for the
    ensemble, with and without TTA; the ensemble's blend and threshold are the folds' in both."""
    epochs = {}
    for b in used:
        live = full_dir(models, b) / "live" / "metrics.json"
        epochs[b] = json.loads(live.read_text()).get("epoch") if live.is_file() else None
    out = {"on": True, "backbones": used, "epochs": epochs, "test": {}}
    for model in [*used, "ensemble"] if used else []:
        for name in (model, model + "_tta"):
            thr = thresholds.get(name, 0.5)
            out["test"][name] = {kind: {k: binary_metrics(t["label"], t[name], thr)[k] for k in ("accuracy", "roc_auc")}
                                 for kind, t in (("fold_average", fold_average), ("refit", refit))}
            m = out["test"][name]
            log.info("%-24s test acc %.4f AUC %.4f (fold average) | %.4f AUC %.4f (refit)", name,
                     m["fold_average"]["accuracy"], m["fold_average"]["roc_auc"], m["refit"]["accuracy"],
                     m["refit"]["roc_auc"])
    return out


def ensemble(models: Path, folds_csv: Path, index_csv: Path, out: Path, *, backbones: list[str],
             refit: bool = False, tta: dict | None = None) -> dict:
    """Write the blended OOF/test/hidden tables and scores.json; with `refit`, test/hidden come from the refit models
    where a backbone has one, and scores.json compares them with the fold average. `tta` (views, crop_scale: the
    params the train stages' `_tta` columns were made with) is recorded for `predict --model ensemble --tta`."""
    folds = pd.read_csv(folds_csv, dtype={"img_name": str})
    index = pd.read_csv(index_csv, dtype={"img_name": str})
    tables = gather(models, backbones, folds, index)
    fold_average = tables["test"].copy()  # kept for the refit comparison
    used = use_refit(models, backbones, tables) if refit else []
    oof, y, fold = tables["oof"], tables["oof"]["label"].to_numpy(int), tables["oof"]["fold"].to_numpy()
    seen = labelled_test_seen(index)
    if seen:
        log.warning("The labelled test images are also training images (data.train_on_test): every test score "
                    "below is on seen cells, not a held-out estimate")
    report = {"cv": True, "test_seen": seen, "blend": {}, "metrics": {}}
    if tta is not None:
        report["tta"] = {"views": list(tta["views"]), "crop_scale": tta["crop_scale"]}
    cv_thresholds = {}  # the ensemble's OOF is scored at the thresholds other folds chose, not in-sample
    for suffix in ("", "_tta"):
        cols = [b + suffix for b in backbones]
        method, w, scores = choose_blend(oof[cols].to_numpy(), y, fold)
        for t in [*tables.values(), fold_average]:
            t["ensemble" + suffix] = blend(t[cols].to_numpy(), w)
        thr, cv_thresholds["ensemble" + suffix], thr_scores = choose_threshold(oof["ensemble" + suffix], y, fold)
        report["blend"]["ensemble" + suffix] = {"method": method, "weights": dict(zip(backbones, w.round(4).tolist())),
                                               "cv_log_loss": scores, "threshold": thr,
                                               "threshold_cv_accuracy": thr_scores}
        log.info("ensemble%s: %s blend (CV log loss %s), weights %s, threshold %.3f (CV accuracy at 0.5 %.4f, "
                 "tuned on the other folds %.4f, McNemar p %.2g)", suffix, method,
                 {k: round(v, 4) for k, v in scores.items()}, np.round(w, 3).tolist(), thr, thr_scores["fixed"],
                 thr_scores["tuned"], thr_scores["p_value"])
    test = tables["test"]
    for model in [*backbones, "ensemble"]:
        for suffix in ("", "_tta"):
            name = model + suffix
            thr = report["blend"][name]["threshold"] if model == "ensemble" else 0.5
            report["metrics"][name] = {"cv": binary_metrics(y, oof[name], cv_thresholds.get(name, thr)),
                                       "test": binary_metrics(test["label"], test[name], thr), "threshold": thr}
            m = report["metrics"][name]
            log.info("%-24s CV acc %.4f AUC %.4f | test acc %.4f AUC %.4f", name, m["cv"]["accuracy"],
                     m["cv"]["roc_auc"], m["test"]["accuracy"], m["test"]["roc_auc"])
    met = report["metrics"]
    report["tta_gain"] = {model: {f"{split}_{k}": met[model + "_tta"][split][k] - met[model][split][k]
                                  for split in ("cv", "test") for k in ("accuracy", "roc_auc", "log_loss")}
                          for model in [*backbones, "ensemble"]}
    thresholds = {name: b["threshold"] for name, b in report["blend"].items()}
    report["refit"] = refit_report(models, used, fold_average, test, thresholds) if refit else {"on": False}
    _write(out, tables, report)
    return report


def ensemble_without_folds(models: Path, index_csv: Path, out: Path, *, backbones: list[str],
                           tta: dict | None = None) -> dict:
    """folds.n 0: each backbone's all-cells model (full/) on test and hidden, blended with equal weights in logit space
    at threshold 0.5. With no out-of-fold predictions nothing is fitted (the labelled test set is never used to
    choose), so oof.csv has its columns and no rows, and every CV score is null."""
    index = pd.read_csv(index_csv, dtype={"img_name": str})
    cols = [c for b in backbones for c in (b, f"{b}_tta")]
    tables = {"oof": pd.DataFrame(columns=["img_name", "label", "fold", *cols, "ensemble", "ensemble_tta"]),
              "test": index.loc[index["split"] == "test", ["img_name", "label"]].reset_index(drop=True),
              "hidden": index.loc[index["split"] == "hidden", ["img_name"]].reset_index(drop=True)}
    for b in backbones:
        for split in ("test", "hidden"):
            f = full_dir(models, b) / f"{split}.csv"
            if not f.is_file():
                raise PipelineError(f"{f} is missing: folds.n is 0, so {b} trains once on all cells; run "
                                    f"`dvc repro train@{b}`.")
            p = pd.read_csv(f, dtype={"img_name": str}).set_index("img_name")
            t = tables[split]
            t[b], t[f"{b}_tta"] = t["img_name"].map(p["prob"]).to_numpy(), t["img_name"].map(p["prob_tta"]).to_numpy()
            if t[b].isna().any():
                raise PipelineError(f"{f} has no prediction for {int(t[b].isna().sum())} {split} images; re-run "
                                    f"`dvc repro -f train@{b}`.")
    seen = labelled_test_seen(index)
    report = {"cv": False, "test_seen": seen, "blend": {}, "metrics": {}, "refit": {"on": False}}
    if tta is not None:
        report["tta"] = {"views": list(tta["views"]), "crop_scale": tta["crop_scale"]}
    equal = np.full(len(backbones), 1 / len(backbones))
    for suffix in ("", "_tta"):
        for t in tables.values():
            t["ensemble" + suffix] = blend(t[[b + suffix for b in backbones]].to_numpy(float), equal) if len(t) else []
        report["blend"]["ensemble" + suffix] = {"method": "mean", "weights": dict(zip(backbones, equal.round(4).tolist())),
                                               "cv_log_loss": None, "threshold": 0.5, "threshold_cv_accuracy": None}
    test = tables["test"]
    for name in [m + s for m in [*backbones, "ensemble"] for s in ("", "_tta")]:
        report["metrics"][name] = {"cv": None, "test": binary_metrics(test["label"], test[name], 0.5), "threshold": 0.5}
        log.info("%-24s no CV (folds.n 0) | test acc %.4f AUC %.4f", name, report["metrics"][name]["test"]["accuracy"],
                 report["metrics"][name]["test"]["roc_auc"])
    met = report["metrics"]
    report["tta_gain"] = {m: {f"test_{k}": met[m + "_tta"]["test"][k] - met[m]["test"][k]
                              for k in ("accuracy", "roc_auc", "log_loss")} for m in [*backbones, "ensemble"]}
    _write(out, tables, report)
    return report


def _write(out: Path, tables: dict[str, pd.DataFrame], report: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for split, t in tables.items():
        with written_whole(out / f"{split}.csv") as tmp:
            t.to_csv(tmp, index=False, float_format="%.6f")
    write_text_whole(out / "scores.json", json.dumps(report, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", required=True, help="folder of the train stages' <backbone>/fold<k>/ outputs")
    parser.add_argument("--folds", required=True)
    parser.add_argument("--index", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    params = load_params()
    train = params["train"]
    if params["folds"]["n"] == 0:
        ensemble_without_folds(Path(args.models), Path(args.index), Path(args.out), backbones=train["backbones"],
                               tta=params["tta"])
        return
    ensemble(Path(args.models), Path(args.folds), Path(args.index), Path(args.out), backbones=train["backbones"],
             refit=train["refit"], tta=params["tta"])


if __name__ == "__main__":
    run_main(main)
