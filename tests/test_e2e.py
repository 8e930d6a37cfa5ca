"""End-to-end: `dvc repro` of a tiny configuration in a temporary copy of the project."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from test_report import check_executed_report

ROOT = Path(__file__).resolve().parents[1]


def project_copy(tmp: Path, **overrides) -> Path:
    """Copy the tracked project files to tmp, apply dotted-key param overrides, and commit (dvclive needs a commit)."""
    dst = tmp / "project"
    dst.mkdir()
    for name in ("pipeline", "notebooks", ".dvc", "dvc.yaml", "params.yaml", ".dvcignore", ".gitignore"):
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dst / name, ignore=shutil.ignore_patterns("__pycache__", "tmp", "cache"))
        elif src.exists():
            shutil.copy(src, dst / name)
    params = yaml.safe_load((dst / "params.yaml").read_text())
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = params
        for p in parents:
            node = node[p]
        node[leaf] = value
    (dst / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git = ["git", "-c", "user.email=ci@example.com", "-c", "user.name=ci"]
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "tiny"]):
        subprocess.run(git + cmd, cwd=dst, check=True, capture_output=True)
    return dst


def dvc(project: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "HF_HUB_OFFLINE": "1", "DVC_NO_ANALYTICS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    r = subprocess.run([Path(sys.executable).parent / "dvc", *args], cwd=project, env=env, capture_output=True,
                       text=True, timeout=1800)
    assert r.returncode == 0, f"dvc {' '.join(args)} failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return r


def test_synthetic_default_data_stages(tmp_path):
    """The offline default: generated data through download, prepare and folds; a second repro is a no-op."""
    project = project_copy(tmp_path, **{"data.synthetic": {"n_train": 60, "n_test": 20, "n_hidden": 20},
                                        "data.img_size": 32})
    dvc(project, "repro", "folds")
    index = pd.read_csv(project / "data/prepared/index.csv")
    assert index["split"].value_counts().to_dict() == {"train": 60, "test": 20, "hidden": 20}
    folds = pd.read_csv(project / "data/folds.csv")
    assert sorted(folds["fold"].unique()) == list(range(5))
    assert "didn't change" in dvc(project, "repro", "folds").stdout


def test_tiny_full_chain_on_real_sample(tmp_path, shared_data):
    """The whole chain on the real competition sample, tiny: every submission valid for the 600 hidden images."""
    project = project_copy(tmp_path, **{
        "data.source": "local", "data.path": str(shared_data / "nndl-hw2-sample.zip"), "data.img_size": 32,
        "folds.n": 2, "train.folds": [0, 1], "train.backbones": ["resnet10t", "efficientnet_b0"],
        "train.epochs": 1, "train.batch_size": 128, "train.num_workers": 0, "distill.epochs": 1,
        "distill.timing_images": 32, "tta.views": ["identity", "hflip"]})
    dvc(project, "repro")
    sample = pd.read_csv(project / "data/prepared/sample_submission.csv")
    assert len(sample) == 600
    board = pd.read_csv(project / "submissions/leaderboard.csv")
    expected = {f"{m}{s}.csv" for m in ("resnet10t", "efficientnet_b0", "ensemble", "student") for s in ("", "_tta")}
    assert set(board["file"]) == expected
    for f in expected:
        sub = pd.read_csv(project / "submissions" / f)
        assert list(sub.columns) == ["img_name", "label"]
        assert sub["img_name"].tolist() == sample["img_name"].tolist()
        assert set(sub["label"].unique()) <= {0, 1}
    folds = pd.read_csv(project / "data/folds.csv")
    for backbone in ("resnet10t", "efficientnet_b0"):
        oof = pd.concat(pd.read_csv(project / f"data/models/{backbone}/fold{k}/oof.csv") for k in (0, 1))
        assert sorted(oof["img_name"]) == sorted(folds["img_name"])  # every train image exactly once
        assert len(folds) == 3000
    check_executed_report(project)
    assert "didn't change" in dvc(project, "repro").stdout
    shown = dvc(project, "metrics", "show").stdout
    assert "data/ensemble/metrics.json" in shown
    # A finished (backbone, fold) forced to run again is not retrained and keeps its curves.
    again = dvc(project, "repro", "-f", "-s", "train@resnet10t-0")
    assert "not retraining" in again.stderr + again.stdout
    assert (project / "data/models/resnet10t/fold0/live/plots/metrics/train_loss.tsv").is_file()
