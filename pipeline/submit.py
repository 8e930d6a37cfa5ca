"""Stage `submit` writes validated submission CSVs and a local leaderboard; `python -m pipeline.submit FILE` sends one to Kaggle."""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.lib.common import PipelineError, git_commit, run_main, written_whole
from pipeline.lib.params import load_params

log = logging.getLogger(__name__)


def validate_submission(sub: pd.DataFrame, sample: pd.DataFrame, name: str = "submission") -> None:
    """Fail unless `sub` has the sample's columns, ids and row order, and int labels in {0, 1} with no NaN."""
    problems = []
    if list(sub.columns) != list(sample.columns):
        problems.append(f"columns are {list(sub.columns)}, expected {list(sample.columns)}")
    elif len(sub) != len(sample):
        problems.append(f"{len(sub)} rows, expected {len(sample)}")
    else:
        id_col, label_col = sample.columns[0], sample.columns[1]
        wrong = np.flatnonzero(sub[id_col].astype(str).to_numpy() != sample[id_col].astype(str).to_numpy())
        if len(wrong):
            problems.append(f"ids differ from the sample's at rows {', '.join(str(i + 2) for i in wrong[:5])} "
                            f"(e.g. {sub[id_col].iat[wrong[0]]!r})")
        labels = pd.to_numeric(sub[label_col], errors="coerce")
        if labels.isna().any():
            problems.append(f"{int(labels.isna().sum())} missing or non-numeric labels")
        elif not labels.isin([0, 1]).all() or (labels != labels.round()).any():
            problems.append(f"labels outside {{0, 1}}: {sorted(set(labels[~labels.isin([0, 1])]))[:5]}")
    if problems:
        raise PipelineError(f"{name} is not a valid submission: " + "; ".join(problems) + ".")


def make_submissions(ensemble_dir: Path, student_dir: Path, sample_csv: Path, out: Path, *,
                     backbones: list[str], metrics_json: Path | None = None) -> pd.DataFrame:
    """One CSV per model (each backbone, ensemble, student) with and without TTA, leaderboard.csv, and the
    run's headline metrics in `metrics_json`."""
    sample = pd.read_csv(sample_csv, dtype={"img_name": str})
    hidden = pd.read_csv(ensemble_dir / "hidden.csv", dtype={"img_name": str}).set_index("img_name")
    student = pd.read_csv(student_dir / "hidden.csv", dtype={"img_name": str}).set_index("img_name")
    hidden["student"], hidden["student_tta"] = student["prob"], student["prob_tta"]
    escores = json.loads((ensemble_dir / "scores.json").read_text())
    metrics = escores["metrics"]
    smetrics = json.loads((student_dir / "scores.json").read_text())
    # The ensemble and distill stages read from index.csv whether the test images are also training images.
    all_seen = bool(escores.get("test_seen") or smetrics.get("test_seen"))
    rows = []
    out.mkdir(parents=True, exist_ok=True)
    for model in [*backbones, "ensemble", "student"]:
        for suffix in ("", "_tta"):
            name = model + suffix
            m = metrics.get(name, {"cv": {}, "test": smetrics.get(name, {}).get("test", {}), "threshold": 0.5})
            cv = m["cv"] or {}  # None without folds (folds.n 0): no CV score, an empty cell
            prob = sample["img_name"].map(hidden[name])
            if prob.isna().any():
                raise PipelineError(f"{int(prob.isna().sum())} images of {sample_csv} have no {name} prediction.")
            sub = pd.DataFrame({"img_name": sample["img_name"], "label": (prob >= m["threshold"]).astype(int)})
            sub = sub[sample.columns]
            validate_submission(sub, sample, name)
            with written_whole(out / f"{name}.csv") as tmp:  # a kill never leaves a truncated submission
                sub.to_csv(tmp, index=False)
            # Not held out: the test images were in training (data.train_on_test), or the student learned them
            # unlabelled (distill.unlabelled), which makes its score transductive.
            seen = all_seen or (model == "student" and bool(smetrics.get("unlabelled", {}).get("test_transductive")))
            rows.append({"file": f"{name}.csv", "model": model, "tta": bool(suffix), "threshold": m["threshold"],
                         "cv_accuracy": cv.get("accuracy"), "cv_roc_auc": cv.get("roc_auc"),
                         "test_accuracy": m["test"].get("accuracy"), "test_roc_auc": m["test"].get("roc_auc"),
                         "hidden_positive_rate": sub["label"].mean(), "test_seen": seen})
    # Held-out test scores rank first: a score on test images a model learned from is no estimate.
    board = pd.DataFrame(rows).sort_values(["test_seen", "test_accuracy", "test_roc_auc", "cv_accuracy"],
                                           ascending=[True, False, False, False], na_position="last")
    with written_whole(out / "leaderboard.csv") as tmp:
        board.to_csv(tmp, index=False, float_format="%.4f")
    log.info("Local leaderboard (labelled test set):\n%s", board.to_string(index=False))
    if metrics_json is not None:
        metrics_json.write_text(json.dumps(headline(board, all_seen), indent=2))
    return board


def headline(board: pd.DataFrame, test_seen: bool = False) -> dict:
    """The few numbers `dvc metrics show` / `dvc exp show` compare: per model (no TTA / TTA) CV and test
    accuracy and ROC AUC, the leaderboard's best file, and whether the test images were in training (then no test
    score is comparable with a held-out run's). Minutes are data/timing.json's alone, one column per stage."""
    r4 = lambda v: None if pd.isna(v) else round(float(v), 4)
    models = {row["file"].removesuffix(".csv"): {k: r4(row[k]) for k in ("cv_accuracy", "cv_roc_auc", "test_accuracy",
                                                                         "test_roc_auc")}
              for _, row in board.iterrows()}
    best = board.iloc[0]
    return {"models": models, "best": {"file": best["file"], "test_accuracy": r4(best["test_accuracy"])},
            "test_seen": test_seen}


def send(file: Path, *, competition: str, message: str, leaderboard: Path, sample_csv: Path, dry_run: bool) -> list[str]:
    """Validate `file` against the sample and submit it with the Kaggle API (or only show the call)."""
    if not file.is_file():
        raise PipelineError(f"{file} does not exist; run `dvc repro` to write the submissions.")
    validate_submission(pd.read_csv(file), pd.read_csv(sample_csv), str(file))
    board = pd.read_csv(leaderboard) if leaderboard.is_file() else pd.DataFrame(columns=["file"])
    row = board[board["file"] == file.name]
    scores = "" if row.empty else (f" | CV acc {row['cv_accuracy'].iat[0]:.4f} | local test acc "
                                   f"{row['test_accuracy'].iat[0]:.4f}")
    full = f"{message + ' | ' if message else ''}{file.stem} | git {git_commit()}{scores}"
    cmd = ["kaggle", "competitions", "submit", "-c", competition, "-f", str(file), "-m", full]
    if dry_run:
        log.info("Dry run, not sent: %s", " ".join(repr(c) if " " in c else c for c in cmd))
        return cmd
    from pipeline.lib.kaggle_client import kaggle_api

    api = kaggle_api()
    try:
        api.competition_submit(str(file), full, competition)
    except Exception as e:
        raise PipelineError(f"Submitting to {competition} failed: {type(e).__name__}: {e}") from None
    log.info("Submitted %s to %s: %s", file, competition, full)
    return cmd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("file", nargs="?", type=Path, help="submission to send (default: the leaderboard's best)")
    parser.add_argument("-m", "--message", default="", help="submission message (git commit and scores are added)")
    parser.add_argument("--dry-run", action="store_true", help="validate and show the kaggle call without sending")
    parser.add_argument("--make", action="store_true", help="(the DVC stage) write the submissions and leaderboard")
    parser.add_argument("--ensemble", default="data/ensemble")
    parser.add_argument("--student", default="data/student")
    parser.add_argument("--sample", default="data/prepared/sample_submission.csv", type=Path)
    parser.add_argument("--out", default="submissions/latest", type=Path)
    parser.add_argument("--metrics", type=Path, help="(with --make) the headline metrics JSON to write")
    args = parser.parse_args()
    params = load_params()
    if args.make:
        make_submissions(Path(args.ensemble), Path(args.student), args.sample, args.out,
                         backbones=params["train"]["backbones"], metrics_json=args.metrics)
        return
    leaderboard = args.out / "leaderboard.csv"
    file = args.file
    if file is None:
        if not leaderboard.is_file():
            raise PipelineError(f"{leaderboard} does not exist; run `dvc repro` first or name a file.")
        file = args.out / pd.read_csv(leaderboard)["file"].iat[0]
    send(file, competition=params["data"]["competition"], message=args.message, leaderboard=leaderboard,
         sample_csv=args.sample, dry_run=args.dry_run)


if __name__ == "__main__":
    run_main(main)
