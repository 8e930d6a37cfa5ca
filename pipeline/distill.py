"""Stage `distill`: train one small student on all training images against labels and the ensemble's OOF probabilities."""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import distributed as ddp
from pipeline import fingerprint as fp
from pipeline.common import PipelineError, labelled_test_seen, run_main, seed_everything
from pipeline.dataset import CellDataset, load_cache, split_rows, targets
from pipeline.engine import TrainConfig, predict, resolve_device
from pipeline.losses import DistillLoss
from pipeline.metrics import binary_metrics
from pipeline.models import create_model, data_config, load_checkpoint, weights_digest
from pipeline.params import load_params
from pipeline.transforms import AugParams, build_transform
from pipeline.tta import expand_views
from pipeline.workflow import (data_digests, derived_seed, for_backbone, start_processes, train_config, train_logged,
                               write_split_predictions)

log = logging.getLogger(__name__)


def ms_per_image(checkpoints: list[Path], images: np.ndarray, cfg: TrainConfig, view_sets: dict[str, list[str]],
                 crop_scale: float, aug: AugParams) -> dict[str, float]:
    """Wall time per image to predict `images` with every checkpoint, per named set of views (models loaded once,
    beforehand: a second set must not pay for loading the models again)."""
    device = resolve_device(cfg.device)
    models = [load_checkpoint(c, device) for c in checkpoints]
    sets = [CellDataset(images, targets(np.zeros(len(images))), build_transform(False, aug, **ck["data_config"]))
            for _, ck in models]
    # An untimed pass first: a model's first batches of each shape pay for the kernels' setup (oneDNN, cuDNN).
    for (model, _), ds in zip(models, sets):
        predict(model, ds, cfg, device, ["identity"], crop_scale, desc="warm-up")
    out = {}
    for name, views in view_sets.items():
        start = time.perf_counter()
        for (model, _), ds in zip(models, sets):
            predict(model, ds, cfg, device, views, crop_scale, desc="timing")
        out[name] = 1000 * (time.perf_counter() - start) / len(images)
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


def distill(prepared: Path, ensemble_dir: Path, models_dir: Path, out: Path, *, student: str, alpha: float,
            temperature: float, cfg: TrainConfig, aug: AugParams, pretrained: bool, weights_dir: str,
            drop_rate: float, views: list[str], crop_scale: float, teacher_column: str, timing_images: int,
            params: dict, learned: dict | None = None, drop_path_rate: float = 0.0,
            backbones: list[str] = (), unlabelled: str = "none") -> dict:
    """Train (or resume, or reuse) the student and score it against the ensemble; `learned` as in train_fold."""
    index, images = load_cache(prepared)
    oof = pd.read_csv(ensemble_dir / "oof.csv", dtype={"img_name": str})
    if teacher_column not in oof:
        raise PipelineError(f"{ensemble_dir / 'oof.csv'} has no column {teacher_column}; re-run `dvc repro ensemble`.")
    rows = split_rows(index, "train")
    soft = index["img_name"].iloc[rows].map(oof.set_index("img_name")[teacher_column])
    if soft.isna().any():
        raise PipelineError(f"{soft.isna().sum()} training images have no ensemble OOF probability in "
                            f"{ensemble_dir / 'oof.csv'}; re-run the train and ensemble stages.")
    labels = index["label"].to_numpy(dtype=float)
    extra, extra_soft, transductive = unlabelled_rows(index, ensemble_dir, unlabelled, teacher_column)
    # Unlabelled images learn the ensemble twice over: as the (soft) label and as the distillation target.
    target = np.concatenate([targets(labels[rows], soft.to_numpy()), targets(extra_soft, extra_soft)])
    # Soft targets rounded: a GPU's half-precision noise in the teachers' OOF must not retrain the student.
    targets_digest = fp.array_digest(np.round(target.astype(np.float64), 4))
    fingerprint = fp.make({**(learned or {}), "model.student": student},
                          {**data_digests(prepared), "soft_targets": targets_digest,
                           "weights": weights_digest(student, pretrained, weights_dir)})
    seed_everything(cfg.seed)
    model = create_model(student, pretrained=pretrained, weights_dir=weights_dir, drop_rate=drop_rate,
                         drop_path_rate=drop_path_rate)
    norm = data_config(model)
    eval_tf = build_transform(False, aug, **norm)
    train_ds = CellDataset(images[np.concatenate([rows, extra])], target, build_transform(True, aug, **norm),
                           seed=cfg.seed)
    out.mkdir(parents=True, exist_ok=True)
    log.info("Student %s on %d labelled + %d unlabelled images, alpha %.2f, temperature %.1f", student, len(rows),
             len(extra), alpha, temperature)
    if transductive:
        log.warning("The labelled test images are among the student's unlabelled images: its test score is "
                    "transductive (like Kaggle's hidden score), not a held-out estimate")

    # No validation split: every training image is used, and the last epoch is kept.
    _, model = train_logged(model, student, train_ds, None, None, DistillLoss(alpha, temperature, cfg.label_smoothing),
                            cfg, out, params, fingerprint)
    ckpt = out / "checkpoint.pt"
    test_rows = split_rows(index, "test")
    test = write_split_predictions(model, images, index, out, cfg, views, crop_scale, eval_tf)["test"]
    if not ddp.is_main():  # rank 0 times the models and writes the scores
        return {}
    y = labels[test_rows].astype(int)
    ens_scores = json.loads((ensemble_dir / "scores.json").read_text())
    ens = ens_scores["metrics"]
    sample = images[test_rows[:timing_images]]
    # The ensemble's test/hidden predictions come from each backbone's refit model where it has one (train.refit).
    refit = set(ens_scores.get("refit", {}).get("backbones", []))
    teachers = sorted(p for b in backbones
                      for p in (models_dir / b).glob("full/checkpoint.pt" if b in refit else "fold*/checkpoint.pt"))
    view_sets = {"plain": ["identity"], "tta": views}
    student_ms = ms_per_image([ckpt], sample, cfg, view_sets, crop_scale, aug)
    teachers_ms = ms_per_image(teachers, sample, cfg, view_sets, crop_scale, aug)
    report = {
        "student": {"test": binary_metrics(y, test["prob"]), "ms_per_image": student_ms["plain"]},
        "student_tta": {"test": binary_metrics(y, test["prob_tta"]), "ms_per_image": student_ms["tta"]},
        "ensemble": {"test": ens["ensemble"]["test"], "n_models": len(teachers),
                     "ms_per_image": teachers_ms["plain"]},
        "ensemble_tta": {"test": ens["ensemble_tta"]["test"], "n_models": len(teachers),
                         "ms_per_image": teachers_ms["tta"]},
    }
    report["unlabelled"] = {"mode": unlabelled, "images": int(len(extra)), "test_transductive": transductive}
    report["test_seen"] = labelled_test_seen(index)  # the test images were training images (data.train_on_test)
    report["tta_gain"] = {"student": {f"test_{k}": report["student_tta"]["test"][k] - report["student"]["test"][k]
                                      for k in ("accuracy", "roc_auc", "log_loss")}}
    for name, r in list(report.items())[:4]:
        log.info("%-13s test accuracy %.4f AUC %.4f, %.2f ms/image", name, r["test"]["accuracy"], r["test"]["roc_auc"],
                 r["ms_per_image"])
    (out / "scores.json").write_text(json.dumps(report, indent=2))
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
    t, d, tta = params["train"], params["distill"], params["tta"]
    if start_processes("pipeline.distill", t):
        return
    cfg = train_config(t, derived_seed(t["seed"], "student", d["student"]), epochs=d["epochs"], select_best=False)
    views = expand_views(tta["views"])
    distill(Path(args.prepared), Path(args.ensemble), Path(args.models), Path(args.out), student=d["student"],
            alpha=d["alpha"], temperature=d["temperature"], cfg=cfg, aug=AugParams(**params["augment"]),
            pretrained=t["pretrained"], weights_dir=t["weights_dir"], drop_rate=t["drop_rate"], views=views,
            crop_scale=tta["crop_scale"], teacher_column=d["teacher"], timing_images=d["timing_images"],
            params={"train": t, "distill": d, "augment": params["augment"], "img_size": params["data"]["img_size"]},
            learned=fp.learned_params(params, fp.STUDENT_PARAMS), drop_path_rate=t["drop_path_rate"],
            backbones=t["backbones"], unlabelled=d["unlabelled"])
    ddp.shutdown()


if __name__ == "__main__":
    run_main(main)
