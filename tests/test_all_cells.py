"""folds.n 0: each backbone trained once on every training cell (full/), resumable, and the later stages without OOF."""
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

from helpers import pipeline_log, sha256, train_cfg
from pipeline.lib import batch_aug
from pipeline import train as train_mod
from pipeline.lib.common import PipelineError
from pipeline.distill import Recipe, distill
from pipeline.ensemble import ensemble_without_folds
from pipeline.folds import make_folds
from pipeline.lib.models import ModelSpec
from pipeline.lib.params import load_params
from pipeline.lib.transforms import AugParams
from pipeline.lib.tta import TTASpec

ROOT = Path(__file__).resolve().parents[1]
BACKBONE = "resnet10t"
EPOCHS, BATCH, N_TRAIN = 2, 16, 64


def write_params(root: Path, **folds) -> None:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"]["img_size"] = 32
    params["folds"].update({"n": 0, **folds})
    params["train"].update(backbones=[BACKBONE], epochs=EPOCHS, batch_size=BATCH, ema_decay=0.0, num_workers=0,
                           device="cpu", precision="fp32")
    params["tta"]["views"] = ["identity", "hflip"]
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="module")
def mini(nndl_prepared, tmp_path_factory) -> Path:
    """A project folder: the real sample (32 px) cut to 64 training, 40 test and 40 hidden cells, folds.n 0."""
    root = tmp_path_factory.mktemp("allcells")
    index = nndl_prepared.index
    rng = np.random.default_rng(1)
    rows = np.concatenate([np.sort(rng.choice(np.flatnonzero(index["split"] == s), n, replace=False))
                           for s, n in (("train", N_TRAIN), ("test", 40), ("hidden", 40))])
    (root / "prepared").mkdir()
    index.iloc[rows].to_csv(root / "prepared/index.csv", index=False)
    np.save(root / "prepared/images.npy", nndl_prepared.images[rows])
    make_folds(index.iloc[rows], n=0, group_by="patient", seed=0).to_csv(root / "folds.csv", index=False)
    write_params(root)
    return root


def run_train(root: Path, monkeypatch) -> Path:
    """`python -m pipeline.train` for the backbone, in-process, as the DVC stage runs it in `root`."""
    monkeypatch.chdir(root)
    monkeypatch.setattr(sys, "argv", ["train", "--backbone", BACKBONE, "--prepared", "prepared", "--folds",
                                      "folds.csv", "--out", f"models/{BACKBONE}"])
    train_mod.main()
    return root / "models" / BACKBONE / "full"


@pytest.fixture(scope="module")
def trained(mini) -> tuple[Path, str]:
    """The train stage run once without folds, and its log; tests that train again work on a copy (`project`)."""
    with pipeline_log() as records, pytest.MonkeyPatch.context() as mp:
        run_train(mini, mp)
    return mini, "\n".join(r.getMessage() for r in records)


@pytest.fixture
def project(trained, tmp_path) -> Path:
    shutil.copytree(trained[0], tmp_path / "p")
    return tmp_path / "p"


def test_the_folds_stage_says_no_cv_and_the_schema_takes_zero_but_not_one(mini, tmp_path):
    folds = pd.read_csv(mini / "folds.csv")
    assert len(folds) == N_TRAIN and (folds["fold"] == -1).all()
    params = yaml.safe_load((mini / "params.yaml").read_text())
    for n, ok in ((0, True), (1, False), (2, True)):
        params["folds"]["n"] = n
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
        if ok:
            assert load_params(tmp_path / "params.yaml")["folds"]["n"] == n
        else:
            with pytest.raises(PipelineError, match=r"folds.n: 1 .*set 0"):
                load_params(tmp_path / "params.yaml")


def test_each_backbone_trains_once_on_every_training_cell_for_train_epochs(trained):
    root, log = trained
    full = root / "models" / BACKBONE / "full"
    assert {p.name for p in full.iterdir()} >= {"checkpoint.pt", "last.pt", "test.csv", "hidden.csv", "live"}
    assert not list((root / "models" / BACKBONE).glob("fold*")) and not (full / "oof.csv").exists()
    ck = torch.load(full / "checkpoint.pt", weights_only=True)
    assert ck["epoch"] == EPOCHS  # the last epoch is kept
    fp = ck["fingerprint"]
    assert fp["params"]["model.fold"] == "all" and "folds" not in fp["inputs"]
    assert not [k for k in fp["params"] if k.startswith("folds.") or k == "train.patience"]
    assert len(pd.read_csv(full / "live/plots/metrics/train_loss.tsv", sep="\t")) == EPOCHS
    assert f"{BACKBONE} on all cells: {N_TRAIN} train / 0 validation images" in log
    index = pd.read_csv(root / "prepared/index.csv")
    for split in ("test", "hidden"):
        pred = pd.read_csv(full / f"{split}.csv")
        assert pred["img_name"].tolist() == index.loc[index["split"] == split, "img_name"].tolist()
    assert set(json.loads((root / "models" / BACKBONE / "timing.json").read_text())["seconds"]) == {"full"}


def test_changing_the_folds_does_not_retrain_it(project, trained, monkeypatch, caplog):
    """Other fold params and another folds.csv (even a real 2-fold one) leave the all-cells model as it is."""
    index = pd.read_csv(project / "prepared/index.csv")
    make_folds(index, n=2, group_by="none", seed=5).to_csv(project / "folds.csv", index=False)
    write_params(project, seed=5, group_by="none")
    full = project / "models" / BACKBONE / "full"
    before = sha256(full / "checkpoint.pt")
    with caplog.at_level(logging.INFO):
        run_train(project, monkeypatch)
    assert "not retraining" in caplog.text and "Setting aside" not in caplog.text
    assert sha256(full / "checkpoint.pt") == before


def test_a_kill_mid_epoch_resumes_and_ends_byte_identical(mini, trained, tmp_path, monkeypatch, caplog):
    root = tmp_path / "p"
    shutil.copytree(mini, root, ignore=shutil.ignore_patterns("models"))
    steps, calls, real_mix = N_TRAIN // BATCH, [0], batch_aug.mix

    def killed_mid_epoch_2(*args, **kwargs):
        calls[0] += 1
        if calls[0] == steps + 2:  # epoch 2, second step: last.pt holds epoch 1
            raise KeyboardInterrupt
        return real_mix(*args, **kwargs)

    monkeypatch.setattr(batch_aug, "mix", killed_mid_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        run_train(root, monkeypatch)
    full = root / "models" / BACKBONE / "full"
    assert torch.load(full / "last.pt", weights_only=True)["state"]["epoch"] == 1
    monkeypatch.setattr(batch_aug, "mix", real_mix)
    with caplog.at_level(logging.INFO):
        run_train(root, monkeypatch)
    assert "Resuming from" in caplog.text and "after epoch 1" in caplog.text
    unbroken = trained[0] / "models" / BACKBONE / "full"
    for name in ("test.csv", "hidden.csv"):
        assert sha256(full / name) == sha256(unbroken / name), name
    a, b = (torch.load(d / "checkpoint.pt", weights_only=True)["state_dict"] for d in (full, unbroken))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_ensemble_blends_with_equal_weights_at_one_half_without_oof(trained, tmp_path):
    root, _ = trained
    report = ensemble_without_folds(root / "models", root / "prepared/index.csv", tmp_path, backbones=[BACKBONE],
                                    tta={"views": ["identity", "hflip"], "crop_scale": 0.875})
    assert report["cv"] is False and report["blend"]["ensemble_tta"] == {
        "method": "mean", "weights": {BACKBONE: 1.0}, "cv_log_loss": None, "threshold": 0.5,
        "threshold_cv_accuracy": None}
    assert all(m["cv"] is None and m["threshold"] == 0.5 for m in report["metrics"].values())
    assert len(pd.read_csv(tmp_path / "oof.csv")) == 0
    test = pd.read_csv(tmp_path / "test.csv")
    np.testing.assert_allclose(test["ensemble"], test[BACKBONE], atol=1e-5)  # one backbone: the blend is itself
    with pytest.raises(PipelineError, match="folds.n is 0.*dvc repro train@densenet121"):
        ensemble_without_folds(root / "models", root / "prepared/index.csv", tmp_path, backbones=["densenet121"])


def test_the_student_refuses_a_label_check_it_cannot_make(trained, tmp_path):
    root, _ = trained
    ensemble_without_folds(root / "models", root / "prepared/index.csv", tmp_path / "ens", backbones=[BACKBONE])
    recipe = Recipe(0.5, 2.0, "ensemble_tta", "none", "drop", 8)
    with pytest.raises(PipelineError, match="label_noise is drop, but folds.n is 0"):
        distill(root / "prepared", tmp_path / "ens", root / "models", tmp_path / "student",
                student=ModelSpec(BACKBONE), recipe=recipe, cfg=train_cfg(epochs=1, device="cpu"), aug=AugParams(),
                tta=TTASpec(), params={}, backbones=[BACKBONE])


def test_bench_ablate_names_the_fix_without_folds(mini, tmp_path):
    from pipeline.tools.ablations import bench_ablate

    params = load_params(mini / "params.yaml")
    with pytest.raises(PipelineError, match="folds.n is 0: add --set folds.n=3"):
        bench_ablate(mini / "prepared", mini / "folds.csv", tmp_path / "ablate", params, "base", [])


def test_the_layout_lists_fold_folders_in_fold_order(tmp_path):
    """One module says where models live: fold<k>/ in fold order (fold10 after fold2), full/ apart, other names not."""
    from pipeline.lib.layout import fold_dirs, model_folders, prediction_dirs

    for name in ("fold10", "fold2", "fold0", "full", "fold_old", "folder"):
        (tmp_path / "resnet10t" / name).mkdir(parents=True)
    for name in ("fold0", "fold10", "full"):
        (tmp_path / "resnet10t" / name / "checkpoint.pt").write_bytes(b"")
    assert [d.name for d in fold_dirs(tmp_path / "resnet10t")] == ["fold0", "fold2", "fold10"]
    assert [d.name for d in prediction_dirs(tmp_path, "resnet10t", refit=False)] == ["fold0", "fold10"]
    assert prediction_dirs(tmp_path, "resnet10t", refit=True) == [tmp_path / "resnet10t" / "full"]
    assert model_folders(3) == ["fold0", "fold1", "fold2"] and model_folders(0) == ["full"]
