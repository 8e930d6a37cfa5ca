"""train.refit: after the folds, one model per backbone on every training cell, used for test/hidden by the ensemble."""
from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from helpers import pipeline_log, sha256
from pipeline import train as train_mod
from pipeline.lib.common import PipelineError
from pipeline.ensemble import ensemble
from pipeline.folds import make_folds
from pipeline.lib.metrics import binary_metrics
from pipeline.train import refit_epochs

ROOT = Path(__file__).resolve().parents[1]
BACKBONE = "resnet10t"


@pytest.fixture(scope="module")
def mini(nndl_prepared, tmp_path_factory) -> Path:
    """A project folder: the real sample (32 px) cut to 64 training, 40 test and 40 hidden cells, 2 grouped folds,
    and a params.yaml for resnet10t, 2 epochs, refit on."""
    root = tmp_path_factory.mktemp("refit")
    index = nndl_prepared.index
    rng = np.random.default_rng(0)
    rows = np.concatenate([np.sort(rng.choice(np.flatnonzero(index["split"] == s), n, replace=False))
                           for s, n in (("train", 64), ("test", 40), ("hidden", 40))])
    (root / "prepared").mkdir()
    index.iloc[rows].to_csv(root / "prepared/index.csv", index=False)
    np.save(root / "prepared/images.npy", nndl_prepared.images[rows])
    make_folds(index.iloc[rows], n=2, group_by="patient", seed=0).to_csv(root / "folds.csv", index=False)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"]["img_size"] = nndl_prepared.img_size
    params["train"].update(backbones=[BACKBONE], epochs=2, batch_size=16, patience=5, ema_decay=0.0, refit=True,
                           num_workers=0, device="cpu", precision="fp32")
    params["tta"]["views"] = ["identity", "hflip"]
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


def set_refit(root: Path, on: bool) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["train"]["refit"] = on
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def run_train(root: Path, monkeypatch) -> Path:
    """`python -m pipeline.train` for the backbone, in-process, as the DVC stage runs it in `root`."""
    monkeypatch.chdir(root)
    monkeypatch.setattr(sys, "argv", ["train", "--backbone", BACKBONE, "--prepared", "prepared", "--folds",
                                      "folds.csv", "--out", f"models/{BACKBONE}"])
    train_mod.main()
    return root / "models" / BACKBONE


class Trained:
    """The project after one run of the train stage with refit on, and that run's log."""

    def __init__(self, root: Path, log: str):
        self.root, self.log = root, log


@pytest.fixture(scope="module")
def trained(mini) -> Trained:
    """The train stage run once with refit on; tests that train again get a copy (`project`)."""
    with pipeline_log() as records, pytest.MonkeyPatch.context() as mp:
        run_train(mini, mp)
    return Trained(mini, "\n".join(r.getMessage() for r in records))


@pytest.fixture
def project(trained, tmp_path) -> Path:
    shutil.copytree(trained.root, tmp_path / "p")
    return tmp_path / "p"


def test_refit_epochs_is_the_rounded_mean_of_the_kept_epochs(tmp_path):
    for kept, expected in (([2, 3], 3), ([1, 2, 2], 2), ([4], 4), ([1, 1, 2, 2], 2)):  # 2.5 rounds up, not to even
        d = tmp_path / "-".join(map(str, kept))
        for k, epoch in enumerate(kept):
            (d / f"fold{k}").mkdir(parents=True)
            torch.save({"epoch": epoch}, d / f"fold{k}" / "checkpoint.pt")
        assert refit_epochs(d, list(range(len(kept)))) == expected, kept
    with pytest.raises(PipelineError, match="fold2/checkpoint.pt is missing.*train all folds"):
        refit_epochs(tmp_path / "2-3", [0, 1, 2])


def test_refit_trains_on_every_training_cell_for_the_folds_mean_epochs(trained):
    root, out = trained.root, trained.root / "models" / BACKBONE
    full = out / "full"
    assert {p.name for p in full.iterdir()} >= {"checkpoint.pt", "last.pt", "test.csv", "hidden.csv", "live"}
    assert not (full / "oof.csv").exists()  # no held-out cells
    kept = [torch.load(out / f"fold{k}/checkpoint.pt", weights_only=False)["epoch"] for k in (0, 1)]
    n = int(np.floor(np.mean(kept) + 0.5))
    ck = torch.load(full / "checkpoint.pt", weights_only=False)
    assert ck["epoch"] == n  # the last epoch is kept
    last = torch.load(full / "last.pt", weights_only=False)
    assert last["fingerprint"]["params"]["config.epochs"] == n and not last["fingerprint"]["params"][
        "config.select_best"]
    assert last["fingerprint"]["params"]["model.fold"] == "full" and "folds" in last["fingerprint"]["inputs"]
    assert len(pd.read_csv(full / "live/plots/metrics/train_loss.tsv", sep="\t")) == n
    assert "val_roc_auc" not in last["state"]["best"]  # no validation set
    index = pd.read_csv(root / "prepared/index.csv")
    for split in ("test", "hidden"):
        pred = pd.read_csv(full / f"{split}.csv")
        assert list(pred.columns) == ["img_name", "prob", "prob_tta"]
        assert pred["img_name"].tolist() == index.loc[index["split"] == split, "img_name"].tolist()
        assert pred[["prob", "prob_tta"]].stack().between(0, 1).all()
    fold0 = pd.read_csv(out / "fold0/test.csv")
    assert not np.allclose(fold0["prob"], pd.read_csv(full / "test.csv")["prob"])  # another model
    timing = json.loads((out / "timing.json").read_text())["seconds"]
    assert set(timing) == {"fold0", "fold1", "full"}
    # Every cell of folds.csv trains the refit, none is held out.
    n_cells = len(pd.read_csv(root / "folds.csv"))
    assert f"{BACKBONE} refit: {n_cells} train / 0 validation images" in trained.log
    assert f"trained on all {n_cells} cells" in trained.log


def test_refit_is_reused_and_retrains_when_its_epochs_change(project, trained, monkeypatch, caplog):
    full = project / "models" / BACKBONE / "full"
    with caplog.at_level(logging.INFO):
        run_train(project, monkeypatch)
    assert caplog.text.count("not retraining") == 3 and "Setting aside" not in caplog.text  # two folds and full
    assert sha256(full / "checkpoint.pt") == sha256(trained.root / "models" / BACKBONE / "full/checkpoint.pt")
    n = torch.load(full / "checkpoint.pt", weights_only=False)["epoch"]
    monkeypatch.setattr(train_mod, "refit_epochs", lambda *a: n + 1)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        run_train(project, monkeypatch)
    assert caplog.text.count("not retraining") == 2  # the folds only
    assert "Setting aside" in caplog.text and f"config.epochs: {n} -> {n + 1}" in caplog.text
    assert torch.load(full / "checkpoint.pt", weights_only=False)["epoch"] == n + 1


def test_refit_off_removes_full_and_keeps_the_folds(project, monkeypatch, caplog):
    set_refit(project, False)
    out = project / "models" / BACKBONE
    with caplog.at_level(logging.INFO):
        run_train(project, monkeypatch)
    assert not (out / "full").exists() and "train.refit is off" in caplog.text
    assert caplog.text.count("not retraining") == 2  # toggling refit does not retrain the folds
    assert set(json.loads((out / "timing.json").read_text())["seconds"]) == {"fold0", "fold1"}


def fold_average(out: Path, split: str) -> pd.DataFrame:
    parts = [pd.read_csv(out / f"fold{k}" / f"{split}.csv") for k in (0, 1)]
    return pd.concat(parts).groupby("img_name")[["prob", "prob_tta"]].mean()


def test_ensemble_uses_the_refit_for_test_and_hidden_and_compares(trained, tmp_path):
    root = trained.root
    models, out = root / "models", root / "models" / BACKBONE
    args = (models, root / "folds.csv", root / "prepared/index.csv")
    on = ensemble(*args, tmp_path / "on", backbones=[BACKBONE], refit=True)
    off = ensemble(*args, tmp_path / "off", backbones=[BACKBONE], refit=False)
    for split in ("test", "hidden"):
        t_on, t_off = (pd.read_csv(tmp_path / d / f"{split}.csv").set_index("img_name") for d in ("on", "off"))
        full = pd.read_csv(out / "full" / f"{split}.csv").set_index("img_name")
        np.testing.assert_allclose(t_on[BACKBONE], full.loc[t_on.index, "prob"], atol=1e-6)
        np.testing.assert_allclose(t_on[f"{BACKBONE}_tta"], full.loc[t_on.index, "prob_tta"], atol=1e-6)
        np.testing.assert_allclose(t_off[BACKBONE], fold_average(out, split).loc[t_off.index, "prob"], atol=1e-6)
    # OOF, the blend and its threshold stay the folds'.
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "on/oof.csv"), pd.read_csv(tmp_path / "off/oof.csv"))
    assert on["blend"] == off["blend"]
    assert off["refit"] == {"on": False} and on["test_seen"] is False and off["test_seen"] is False
    r = on["refit"]
    assert r["on"] and r["backbones"] == [BACKBONE] and r["epochs"][BACKBONE] >= 1
    assert set(r["test"]) == {BACKBONE, f"{BACKBONE}_tta", "ensemble", "ensemble_tta"}
    test = pd.read_csv(tmp_path / "off/test.csv")
    y = test["label"].to_numpy()
    for name in r["test"]:
        thr = on["metrics"][name]["threshold"]
        assert r["test"][name]["fold_average"]["accuracy"] == pytest.approx(
            binary_metrics(y, test[name], thr)["accuracy"])
        assert r["test"][name]["fold_average"]["accuracy"] == pytest.approx(off["metrics"][name]["test"]["accuracy"])
        assert r["test"][name]["refit"] == {k: pytest.approx(on["metrics"][name]["test"][k])
                                            for k in ("accuracy", "roc_auc")}
        assert on["metrics"][name]["cv"] == off["metrics"][name]["cv"]


def test_ensemble_without_refit_predictions_keeps_the_fold_average(trained, tmp_path, caplog):
    root = trained.root
    models = tmp_path / "models"
    shutil.copytree(root / "models", models, ignore=shutil.ignore_patterns("full"))
    with caplog.at_level(logging.WARNING):
        r = ensemble(models, root / "folds.csv", root / "prepared/index.csv", tmp_path / "e",
                     backbones=[BACKBONE], refit=True)
    assert "has no refit predictions" in caplog.text and r["refit"]["backbones"] == [] and r["refit"]["test"] == {}
