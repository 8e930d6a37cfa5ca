"""End-to-end: `dvc repro` of a tiny configuration in a temporary copy of the project."""
from __future__ import annotations

import json

import pandas as pd

from helpers import TINY_BACKBONES, check_executed_report, dvc, project_copy, sha256


def test_synthetic_default_data_stages(tmp_path):
    """Generated data (offline) through download, prepare and folds; a second repro is a no-op."""
    project = project_copy(tmp_path, **{"data.source": "synthetic",
                                        "data.synthetic": {"n_train": 60, "n_test": 20, "n_hidden": 20},
                                        "data.img_size": 32})
    dvc(project, "repro", "folds")
    index = pd.read_csv(project / "data/prepared/index.csv")
    assert index["split"].value_counts().to_dict() == {"train": 60, "test": 20, "hidden": 20}
    folds = pd.read_csv(project / "data/folds.csv")
    assert sorted(folds["fold"].unique()) == list(range(3))
    assert "didn't change" in dvc(project, "repro", "folds").stdout


def test_tiny_full_chain_on_real_sample(tiny_chain, shared_data):
    """The whole chain on the real competition sample, tiny: every submission valid for the 600 hidden images."""
    project = tiny_chain.project
    sample = pd.read_csv(project / "data/prepared/sample_submission.csv")
    assert len(sample) == 600
    board = pd.read_csv(project / "submissions/latest/leaderboard.csv")
    expected = {f"{m}{s}.csv" for m in (*TINY_BACKBONES, "ensemble", "student") for s in ("", "_tta")}
    assert set(board["file"]) == expected
    for f in expected:
        sub = pd.read_csv(project / "submissions/latest" / f)
        assert list(sub.columns) == ["img_name", "label"]
        assert sub["img_name"].tolist() == sample["img_name"].tolist()
        assert set(sub["label"].unique()) <= {0, 1}
    folds = pd.read_csv(project / "data/folds.csv")
    for backbone in TINY_BACKBONES:
        oof = pd.concat(pd.read_csv(project / f"data/models/{backbone}/fold{k}/oof.csv") for k in (0, 1))
        assert sorted(oof["img_name"]) == sorted(folds["img_name"])  # every train image exactly once
        assert len(folds) == 3000
    check_executed_report(project)
    assert "didn't change" in dvc(project, "repro").stdout
    shown = dvc(project, "metrics", "show").stdout
    assert "data/metrics.json" in shown and "models.ensemble.cv_accuracy" in shown
    timing = json.loads((project / "data/timing.json").read_text())  # every stage's minutes, a DVC metric
    assert set(timing["minutes"]) == {"validate", "download", "weights", "prepare", "folds",
                                      *(f"train-{b}" for b in TINY_BACKBONES), "ensemble", "distill", "submit", "export",
                                      "report"}
    assert timing["total_minutes"] > 0 and "data/timing.json" in shown and "total_minutes" in shown
    assert "minutes.train-resnet10t" in shown and "minutes.train@" not in shown  # one column per stage's minutes

    # Other data and a third fold in one `dvc exp run -S`, as a user sets keys: every model retrains on the new cells
    # (nothing is resumed from the old ones), and folds.n alone gives a complete 3-fold CV. Up to distill only: the
    # submission, export and report on this data run in the no-fold part below.
    models = [project / f"data/models/{b}/fold{k}" for b in TINY_BACKBONES for k in (0, 1)]
    models.append(project / "data/student")
    before = {m: sha256(m / "checkpoint.pt") for m in models}
    r = dvc(project, "exp", "run", "-S", f"data.path={shared_data / 'cell_images-sample.zip'}", "-S", "folds.n=3",
            "distill")
    log = r.stdout + r.stderr
    assert log.count("Setting aside") == len(models), log[-4000:]  # fold2 is new: nothing to set aside
    assert "cells content changed" in log and "Resuming" not in log and "not retraining" not in log
    assert all(sha256(m / "checkpoint.pt") != h for m, h in before.items())
    folds = pd.read_csv(project / "data/folds.csv")
    assert len(folds) < 1000 and folds["img_name"].str.startswith("C").all()  # the public sample's cells
    assert sorted(folds["fold"].unique()) == [0, 1, 2]
    for b in TINY_BACKBONES:
        assert sorted(d.name for d in (project / "data/models" / b).glob("fold*")) == ["fold0", "fold1", "fold2"]
        for k in range(3):
            m = project / f"data/models/{b}/fold{k}"
            oof = pd.read_csv(m / "oof.csv")
            val = folds[folds["fold"] == k].set_index("img_name")["label"]
            assert sorted(oof["img_name"]) == sorted(val.index)
            acc = ((oof["prob"] >= 0.5).astype(int).to_numpy() == val[oof["img_name"]].to_numpy()).mean()
            kept = json.loads((m / "live/metrics.json").read_text())["val_accuracy"]
            assert abs(acc - kept) <= 1 / len(oof) + 1e-9, (m, acc, kept)  # the OOF comes from the new data's model
    oof = pd.read_csv(project / "data/ensemble/oof.csv")
    assert sorted(oof["img_name"]) == sorted(folds["img_name"]) and oof["ensemble"].notna().all()

    # No folds (folds.n 0), on the public sample still: each backbone once on all cells, through submission, export
    # and report; a second repro is a no-op, and other fold params re-run the stages that list them without
    # retraining anything.
    dvc(project, "exp", "run", "-S", "folds.n=0")
    for b in TINY_BACKBONES:
        assert [d.name for d in (project / "data/models" / b).iterdir() if d.is_dir()] == ["full"]
    board = pd.read_csv(project / "submissions/latest/leaderboard.csv")
    assert board["cv_accuracy"].isna().all() and board["test_accuracy"].notna().all()
    assert json.loads((project / "data/ensemble/scores.json").read_text())["cv"] is False
    assert (project / "data/export/student.onnx").is_file()
    check_executed_report(project)
    again = dvc(project, "repro").stdout
    assert "didn't change" in again and "Running stage" not in again
    before = {m: sha256(m / "checkpoint.pt") for m in [project / f"data/models/{b}/full" for b in TINY_BACKBONES]}
    r = dvc(project, "exp", "run", "-S", "folds.seed=7", "-S", "folds.group_by=none",
            *(f"train@{b}" for b in TINY_BACKBONES))
    log = r.stdout + r.stderr
    assert log.count("not retraining") == 2 and "Setting aside" not in log, log[-4000:]
    assert all(sha256(m / "checkpoint.pt") == h for m, h in before.items())
    assert all((m / "live/plots/metrics/train_loss.tsv").is_file() for m in before)  # a reused model keeps its curves


def test_bad_params_stop_dvc_repro_before_any_work(tmp_path):
    project = project_copy(tmp_path, **{"train.lr": "fast"})
    r = dvc(project, "repro", ok=False)
    assert "train.lr: 'fast' is not allowed" in r.stdout + r.stderr
    assert not (project / "data/raw").exists() and not (project / "data/models").exists()
