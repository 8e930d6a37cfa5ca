"""Stage `distill`: train one small student on all training images against labels and the ensemble's OOF probabilities."""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import TensorDataset

from pipeline.lib import checkpoints
from pipeline.lib import distributed as ddp
from pipeline.lib.checkpoints import load_checkpoint, read_checkpoint
from pipeline.lib.common import PipelineError, labelled_test_seen, run_main, write_text_whole
from pipeline.lib.dataset import load_cache, split_rows, targets
from pipeline.lib.engine import InferConfig, TrainConfig, predict, resolve_device
from pipeline.lib.images import normalize
from pipeline.lib.label_noise import kept_rows, label_issues
from pipeline.lib.layout import fold_dirs, full_dir, prediction_dirs
from pipeline.lib.losses import DistillLoss
from pipeline.lib.metrics import binary_metrics
from pipeline.lib.models import ModelSpec
from pipeline.lib.params import load_params
from pipeline.lib.training import derived_seed, for_backbone, start_processes, train_config, train_model
from pipeline.lib.transforms import AugParams
from pipeline.lib.tta import TTASpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recipe:
    """How the student learns from the ensemble (params.yaml's distill section, the student's network aside)."""
    alpha: float
    temperature: float
    teacher_column: str  # distill.teacher: the ensemble's column the student learns
    unlabelled: str
    label_noise: str
    timing_images: int

    @classmethod
    def from_params(cls, d: dict) -> "Recipe":
        return cls(d["alpha"], d["temperature"], d["teacher"], d["unlabelled"], d["label_noise"], d["timing_images"])


def inference_ms(files: list[Path], images: np.ndarray, cfg: InferConfig, view_sets: dict[str, list[str]],
                 crop_scale: float) -> dict[str, float]:
    """Wall time per image to predict `images` with every checkpoint, per named set of views: inference alone. The
    models are loaded and the images normalised beforehand, batches come from memory (no loader workers to start),
    and every model runs every view once untimed first (oneDNN's and cuDNN's kernel setup per shape)."""
    device = resolve_device(cfg.device)
    cfg = replace(cfg, num_workers=0)
    models = [load_checkpoint(c, device) for c in files]
    sets = [TensorDataset(torch.from_numpy(normalize(images, ck["data_config"]["mean"], ck["data_config"]["std"])),
                          torch.zeros(len(images), 2)) for _, ck in models]
    every_view = list(dict.fromkeys(v for views in view_sets.values() for v in views))
    for (model, _), ds in zip(models, sets):
        predict(model, ds, cfg, device, every_view, crop_scale, desc="warm-up")
    out = {}
    for name, views in view_sets.items():
        start = time.perf_counter()
        for (model, _), ds in zip(models, sets):
            predict(model, ds, cfg, device, views, crop_scale, desc="timing")  # ends on .cpu(): the GPU is done
        out[name] = 1000 * (time.perf_counter() - start) / len(images)
    return out


def teacher_files(models_dir: Path, backbones: list[str], refit: set[str], unlabelled: str, cv: bool = True
                  ) -> list[Path]:
    """The teacher checkpoints the student's targets come from: every backbone's folds (the training images' OOF) and,
    when unlabelled images are fed, the refit or all-cells models (full/) the ensemble predicted them with. Without
    folds (`cv` False) the training cells' targets are their labels, so only those full/ models count."""
    files = []
    for b in backbones:
        folds = [d / "checkpoint.pt" for d in fold_dirs(models_dir / b, "checkpoint.pt")]
        if cv and not folds:
            raise PipelineError(f"{models_dir / b} has no fold checkpoint, but the student's targets come from them: "
                                f"run `dvc repro train@{b}`.")
        files += folds if cv else []
        if (b in refit or not cv) and unlabelled != "none":
            files.append(full_dir(models_dir, b) / "checkpoint.pt")
            if not files[-1].is_file():
                raise PipelineError(f"{files[-1]} is missing, but the ensemble's hidden/test predictions came from it: "
                                    f"run `dvc repro train@{b}`.")
    return files


def teacher_sources(files: list[Path], models_dir: Path, blend: dict, *, teacher_column: str, unlabelled: str,
                    tta: TTASpec) -> dict:
    """What the student's targets come from, as fingerprint params: each teacher's fingerprint (a digest) and kept
    epoch, the TTA views behind the TTA column, the ensemble's blend and threshold, distill.teacher and .unlabelled.

    Not the probabilities themselves: a GPU re-predicts the same teachers with ~1e-3 of noise (cuDNN's kernel choice,
    half precision), which must not retrain the student; nor the checkpoints' bytes, which hold timings. The blend's
    fitted weights and a tuned threshold move with that noise too, so they count to 0.01."""
    out = {"distill.teacher": teacher_column, "distill.unlabelled": unlabelled,
           "ensemble.blend": blend["method"], "ensemble.threshold": round(float(blend["threshold"]), 2),
           "ensemble.weights": {b: round(float(w), 2) for b, w in sorted(blend["weights"].items())}}
    if teacher_column.endswith("_tta"):
        out.update({"ensemble.views": list(tta.views), "ensemble.crop_scale": tta.crop_scale})
    for f in files:
        ck = read_checkpoint(f, mmap=True)  # weights only; mmap: the tensors are not read
        name = f.parent.relative_to(models_dir).as_posix()
        digest = hashlib.sha256(json.dumps(ck.get("fingerprint"), sort_keys=True, default=str).encode()).hexdigest()
        out.update({f"teacher.{name}.fingerprint": digest[:16], f"teacher.{name}.epoch": ck.get("epoch")})
    return out


def unlabelled_rows(index: pd.DataFrame, ensemble_dir: Path, mode: str, teacher_column: str
                    ) -> tuple[np.ndarray, np.ndarray, bool]:
    """Cache rows the student learns from without labels (semi-supervised), their ensemble probabilities, and
    whether the labelled test images are among them (the student's test score is then transductive).

    Labels are never read here. In the public layout the hidden set is the test holdout itself, so `hidden` alone
    adds nothing: it would quietly make the test score transductive."""
    splits = {"none": [], "hidden": ["hidden"], "hidden_and_test": ["hidden", "test"]}[mode]
    test_names = set(index.loc[index["split"] == "test", "img_name"])
    # Images already learned with their label (the test set under data.train_on_test) are not added again.
    train_names = set(index.loc[index["split"] == "train", "img_name"])
    rows, soft, seen = [], [], set()
    for split in splits:
        table = pd.read_csv(ensemble_dir / f"{split}.csv", dtype={"img_name": str}).set_index("img_name")[teacher_column]
        for r in split_rows(index, split):
            name = index["img_name"].iat[r]
            if name in seen or name in train_names or (mode == "hidden" and name in test_names):
                continue
            seen.add(name)
            rows.append(r)
            soft.append(table[name])
    if mode == "hidden" and not rows and splits and not test_names & train_names:
        log.warning("distill.unlabelled is hidden, but the hidden images are the labelled test images (the public "
                    "layout's holdout): not fed, so the student's test score stays honest")
    return np.asarray(rows, int), np.asarray(soft, float), bool(test_names & seen)


def _oof_targets(ensemble_dir: Path, index: pd.DataFrame, rows: np.ndarray, teacher_column: str) -> np.ndarray:
    """The ensemble's out-of-fold probability (`teacher_column`) of each training row."""
    oof = pd.read_csv(ensemble_dir / "oof.csv", dtype={"img_name": str})
    if teacher_column not in oof:
        raise PipelineError(f"{ensemble_dir / 'oof.csv'} has no column {teacher_column}; re-run `dvc repro ensemble`.")
    soft = index["img_name"].iloc[rows].map(oof.set_index("img_name")[teacher_column])
    if soft.isna().any():
        raise PipelineError(f"{soft.isna().sum()} training images have no ensemble OOF probability in "
                            f"{ensemble_dir / 'oof.csv'}; re-run the train and ensemble stages.")
    return soft.to_numpy(dtype=float)


def distill(prepared: Path, ensemble_dir: Path, models_dir: Path, out: Path, *, student: ModelSpec, recipe: Recipe,
            cfg: TrainConfig, aug: AugParams, tta: TTASpec, params: dict, learned: dict | None = None,
            backbones: list[str] = ()) -> dict:
    """Train (or resume, or reuse) the student and score it against the ensemble. `learned`: the flat params its
    fingerprint holds (checkpoints.learned_params); `params`: what its checkpoint records."""
    teacher_column, unlabelled = recipe.teacher_column, recipe.unlabelled
    index, images = load_cache(prepared)
    ens_scores = json.loads((ensemble_dir / "scores.json").read_text())
    cv = ens_scores.get("cv", True)
    rows = split_rows(index, "train")
    labels = index["label"].to_numpy(dtype=float)
    names = index["img_name"].iloc[rows]
    if cv:
        soft = _oof_targets(ensemble_dir, index, rows, teacher_column)
        issues = label_issues(names, labels[rows], soft)
    else:  # folds.n 0: the teachers saw every training cell, so their probabilities there would only echo the labels
        if recipe.label_noise == "drop":
            raise PipelineError("distill.label_noise is drop, but folds.n is 0: flagging labels needs out-of-fold "
                                "probabilities. Set distill.label_noise: keep, or folds.n to 2 or more.")
        log.info("folds.n 0: the student learns the training cells' labels (no out-of-fold probabilities); the "
                 "teachers reach it only through distill.unlabelled (%s)", unlabelled)
        soft = labels[rows]
        issues = pd.DataFrame({"img_name": names.to_numpy(), "label": labels[rows].astype(int), "prob": np.nan,
                               "label_quality": np.nan, "flagged": False})
    keep = kept_rows(np.arange(len(rows)), issues, names, recipe.label_noise)
    rows, soft = rows[keep], soft[keep]
    extra, extra_soft, transductive = unlabelled_rows(index, ensemble_dir, unlabelled, teacher_column)
    # Unlabelled images learn the ensemble twice over: as the (soft) label and as the distillation target.
    target = np.concatenate([targets(labels[rows], soft), targets(extra_soft, extra_soft)])
    blend = ens_scores.get("blend", {}).get(teacher_column)
    if blend is None:
        raise PipelineError(f"{ensemble_dir / 'scores.json'} has no blend for {teacher_column}; re-run "
                            "`dvc repro ensemble`.")
    # The ensemble's test/hidden predictions come from each backbone's refit model where it has one (train.refit).
    refit = set(ens_scores.get("refit", {}).get("backbones", [])) if cv else set(backbones)
    sources = teacher_sources(teacher_files(models_dir, backbones, refit, unlabelled, cv), models_dir, blend,
                              teacher_column=teacher_column, unlabelled=unlabelled, tta=tta)
    if not cv:  # the folds shaped nothing the student learns
        learned = {k: v for k, v in (learned or {}).items() if not k.startswith("folds.")}
    fingerprint = checkpoints.model_fingerprint(
        {**(learned or {}), "model.student": student.backbone, **sources}, prepared,
        checkpoints.weights_digest(student.backbone, student.pretrained, student.weights_dir))
    out.mkdir(parents=True, exist_ok=True)
    if ddp.is_main():
        write_text_whole(out / "label_issues.csv", issues.to_csv(index=False, float_format="%.6g"))
    log.info("Student %s on %d labelled + %d unlabelled images, alpha %.2f, temperature %.1f", student.backbone,
             len(rows), len(extra), recipe.alpha, recipe.temperature)
    if transductive:
        log.warning("The labelled test images are among the student's unlabelled images: its test score is "
                    "transductive (like Kaggle's hidden score), not a held-out estimate")
    # No validation split: every training image is used, and the last epoch is kept.
    _, _, tables = train_model(student, images, index, np.concatenate([rows, extra]), target, out, aug=aug, tta=tta,
                               loss_fn=DistillLoss(recipe.alpha, recipe.temperature, cfg.label_smoothing), cfg=cfg,
                               record=params, fingerprint=fingerprint, name=f"student {student.backbone}")
    ckpt = out / "checkpoint.pt"
    test_rows = split_rows(index, "test")
    test = tables["test"]
    if not ddp.is_main():  # rank 0 times the models and writes the scores
        return {}
    y = labels[test_rows].astype(int)
    ens = ens_scores["metrics"]
    sample = images[test_rows[:recipe.timing_images]]
    teachers = sorted(d / "checkpoint.pt" for b in backbones for d in prediction_dirs(models_dir, b, b in refit))
    view_sets = {"plain": ["identity"], "tta": list(tta.views)}
    student_ms = inference_ms([ckpt], sample, cfg.inference, view_sets, tta.crop_scale)
    teachers_ms = inference_ms(teachers, sample, cfg.inference, view_sets, tta.crop_scale)
    report = {
        "student": {"test": binary_metrics(y, test["prob"]), "ms_per_image": student_ms["plain"]},
        "student_tta": {"test": binary_metrics(y, test["prob_tta"]), "ms_per_image": student_ms["tta"]},
        "ensemble": {"test": ens["ensemble"]["test"], "n_models": len(teachers),
                     "ms_per_image": teachers_ms["plain"]},
        "ensemble_tta": {"test": ens["ensemble_tta"]["test"], "n_models": len(teachers),
                         "ms_per_image": teachers_ms["tta"]},
    }
    report["label_noise"] = {"mode": recipe.label_noise, "flagged": int(issues["flagged"].sum()),
                             "training_cells": int(len(issues)), "dropped": int(len(issues) - len(rows))}
    report["unlabelled"] = {"mode": unlabelled, "images": int(len(extra)), "test_transductive": transductive}
    report["test_seen"] = labelled_test_seen(index)  # the test images were training images (data.train_on_test)
    report["tta_gain"] = {"student": {f"test_{k}": report["student_tta"]["test"][k] - report["student"]["test"][k]
                                      for k in ("accuracy", "roc_auc", "log_loss")}}
    for name, r in list(report.items())[:4]:
        log.info("%-13s test accuracy %.4f AUC %.4f, %.2f ms/image", name, r["test"]["accuracy"], r["test"]["roc_auc"],
                 r["ms_per_image"])
    write_text_whole(out / "scores.json", json.dumps(report, indent=2))
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prepared", required=True)
    parser.add_argument("--ensemble", required=True, help="the ensemble stage's folder (oof.csv, scores.json)")
    parser.add_argument("--models", required=True, help="the teachers' checkpoints, for the cost comparison")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    params = load_params()
    params = for_backbone(params, params["distill"]["student"])
    t, d = params["train"], params["distill"]
    if start_processes("pipeline.distill", t):
        return
    cfg = train_config(t, derived_seed(t["seed"], "student", d["student"]), epochs=d["epochs"], select_best=False)
    distill(Path(args.prepared), Path(args.ensemble), Path(args.models), Path(args.out),
            student=ModelSpec.from_params(t, d["student"]), recipe=Recipe.from_params(d), cfg=cfg,
            aug=AugParams(**params["augment"]), tta=TTASpec.from_params(params["tta"]),
            params={"train": t, "distill": d, "augment": params["augment"], "img_size": params["data"]["img_size"]},
            learned=checkpoints.learned_params(params, checkpoints.STUDENT_PARAMS), backbones=t["backbones"])
    ddp.shutdown()


if __name__ == "__main__":
    run_main(main)
