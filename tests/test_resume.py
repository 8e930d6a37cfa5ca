"""Resume only what may be resumed: a last.pt/checkpoint.pt is reused only when every input that shaped it is unchanged."""
from __future__ import annotations

import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from pipeline.lib import checkpoints
from pipeline.lib import engine
from pipeline.lib.checkpoints import save_checkpoint
from pipeline.distill import Recipe, distill
from pipeline.folds import make_folds
from pipeline.lib.models import ModelSpec, create_model
from pipeline.lib.teachers import Teacher, train_fold
from pipeline.lib.transforms import AugParams
from pipeline.lib.tta import TTASpec
from helpers import sha256, train_cfg, with_value

ROOT = Path(__file__).resolve().parents[1]
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())
CFG = train_cfg(epochs=2, batch_size=32, num_workers=0, device="cpu", seed=5, patience=5)


@pytest.mark.parametrize("key,value", [
    ("data.img_size", 96), ("folds.n", 7), ("folds.seed", 1), ("train.epochs", 9), ("train.lr", 0.01),
    ("train.pretrained", True), ("train.drop_rate", 0.3), ("train.seed", 1), ("augment.flip", 0.0),
    ("augment.rotate", 45)])
def test_learning_params_change_the_fingerprint(key, value):
    for keys in (checkpoints.TEACHER_PARAMS, checkpoints.STUDENT_PARAMS):
        diff = checkpoints.differences(checkpoints.fingerprint(checkpoints.learned_params(PARAMS, keys), {}),
                              checkpoints.fingerprint(checkpoints.learned_params(with_value(key, value), keys), {}))
        assert diff and key in diff[0], diff


@pytest.mark.parametrize("key,value", [("distill.alpha", 0.9), ("distill.temperature", 4.0), ("distill.epochs", 2),
                                       ("distill.student", "resnet18"), ("distill.teacher", "ensemble")])
def test_distill_params_change_only_the_students_fingerprint(key, value):
    student = [checkpoints.fingerprint(checkpoints.learned_params(p, checkpoints.STUDENT_PARAMS), {}) for p in (PARAMS, with_value(key, value))]
    teacher = [checkpoints.fingerprint(checkpoints.learned_params(p, checkpoints.TEACHER_PARAMS), {}) for p in (PARAMS, with_value(key, value))]
    assert checkpoints.differences(*student) and not checkpoints.differences(*teacher)


@pytest.mark.parametrize("key,value", [("tta.views", ["d4"]), ("tta.crop_scale", 0.8), ("train.num_workers", 4),
                                       ("train.device", "cuda"), ("train.backbones", ["resnet18"]),
                                       ("distill.timing_images", 16), ("data.competition", "other")])
def test_inference_only_params_keep_the_fingerprint(key, value):
    for keys in (checkpoints.TEACHER_PARAMS, checkpoints.STUDENT_PARAMS):
        assert not checkpoints.differences(checkpoints.fingerprint(checkpoints.learned_params(PARAMS, keys), {}),
                                  checkpoints.fingerprint(checkpoints.learned_params(with_value(key, value), keys), {}))


def test_a_last_pt_without_fingerprint_is_named_not_a_crash():
    assert "no fingerprint" in checkpoints.differences(None, checkpoints.fingerprint({}, {}))[0]
    assert checkpoints.differences(checkpoints.fingerprint({"a": 1}, {"images.npy": "x"}), checkpoints.fingerprint({"a": 1}, {"images.npy": "y"})) == \
        ["images.npy content changed"]


@pytest.fixture(scope="module")
def small(nndl_prepared, tmp_path_factory) -> Path:
    """A copy of the prepared real sample (32 px) with a 2-fold folds.csv over 160 of its training cells."""
    root = tmp_path_factory.mktemp("small")
    shutil.copytree(nndl_prepared.out, root / "prepared")
    train = nndl_prepared.index[nndl_prepared.index["split"] == "train"]
    make_folds(train.sample(160, random_state=0), n=2, group_by="patient", seed=0).to_csv(root / "folds.csv",
                                                                                          index=False)
    return root


def run(root: Path, out: Path, *, cfg=CFG, aug=AugParams(), pretrained=False, weights_dir="", drop_rate=0.0,
        learned=None, views=("identity",)) -> dict:
    model = ModelSpec("resnet10t", pretrained=pretrained, weights_dir=weights_dir, drop_rate=drop_rate)
    teacher = Teacher(model, aug, TTASpec(tuple(views), 0.875), learned or {"drop_rate": drop_rate}, {"test": True})
    return train_fold(root / "prepared", root / "folds.csv", out, teacher, fold=0, cfg=cfg)


@pytest.fixture(scope="module")
def trained(small, tmp_path_factory) -> Path:
    """One finished (resnet10t, fold 0) run of `run()`'s defaults, copied by each test that changes one input."""
    out = tmp_path_factory.mktemp("trained") / "fold0"
    run(small, out)
    return out


def rerun(small, trained, tmp_path, caplog, **kwargs) -> tuple[str, Path]:
    out = tmp_path / "fold0"
    shutil.copytree(trained, out)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        run(small, out, **kwargs)
    return caplog.text, out


def test_unchanged_inputs_reuse_the_finished_model_and_tta_only_repredicts(small, trained, tmp_path, caplog):
    log, out = rerun(small, trained, tmp_path, caplog, views=("identity", "hflip"))
    assert "not retraining" in log and "Setting aside" not in log
    assert sha256(out / "checkpoint.pt") == sha256(trained / "checkpoint.pt")
    assert sha256(out / "last.pt") == sha256(trained / "last.pt")
    before, after = (pd.read_csv(d / "oof.csv") for d in (trained, out))
    np.testing.assert_allclose(before["prob"], after["prob"], atol=1e-6)  # same model, same plain predictions
    assert not np.allclose(before["prob_tta"], after["prob_tta"])  # the new TTA views were applied
    # Curves are rewritten (replayed) every run, so they always match last.pt.
    curve = pd.read_csv(out / "live/plots/metrics/train_loss.tsv", sep="\t")
    assert len(curve) == CFG.epochs


def corrupt_one_image(root: Path) -> None:
    """Another picture of the first cell, as prepare writes it: new pixels in the cache and a new digest in the index."""
    images = np.load(root / "prepared/images.npy")
    images[0] = 255 - images[0]
    np.save(root / "prepared/images.npy", images)
    index = pd.read_csv(root / "prepared/index.csv")
    index.loc[0, "hash"] = "0" * 40
    index.to_csv(root / "prepared/index.csv", index=False)


def move_one_image_between_folds(root: Path) -> None:
    folds = pd.read_csv(root / "folds.csv")
    folds.loc[0, "fold"] = 1 - folds.loc[0, "fold"]
    folds.to_csv(root / "folds.csv", index=False)


def corrupt_pixels_only(root: Path) -> None:
    """The cache's pixels of one cell changed while the index still names the old picture (bit rot, a decoder bug)."""
    images = np.load(root / "prepared/images.npy")
    images[0] = 255 - images[0]
    np.save(root / "prepared/images.npy", images)


@pytest.mark.parametrize("what", ["data content", "pixels only", "folds", "image size", "augment", "pretrained",
                                  "drop rate"])
def test_a_changed_input_sets_last_pt_aside_and_trains_fresh(what, small, trained, tmp_path, caplog):
    kwargs, expect = {}, what
    root = small
    if what in ("data content", "pixels only", "folds"):
        root = tmp_path / "copy"
        shutil.copytree(small, root)
        change, expect = {"data content": (corrupt_one_image, "cells content changed"),
                          "pixels only": (corrupt_pixels_only, "cached pixels changed"),
                          "folds": (move_one_image_between_folds, "folds content changed")}[what]
        change(root)
    elif what == "image size":
        kwargs, expect = {"learned": {"drop_rate": 0.0, "data.img_size": 48}}, "data.img_size"
    elif what == "augment":
        kwargs, expect = {"aug": AugParams(flip=0.0), "learned": {"drop_rate": 0.0, "augment.flip": 0.0}}, "augment.flip"
    elif what == "pretrained":
        weights = tmp_path / "weights"
        weights.mkdir()
        torch.save(create_model("resnet10t").state_dict(), weights / "resnet10t.pth")
        kwargs, expect = {"pretrained": True, "weights_dir": str(weights)}, "weights"
    elif what == "drop rate":
        kwargs, expect = {"drop_rate": 0.3}, "drop_rate"
    log, out = rerun(root, trained, tmp_path, caplog, **kwargs)
    assert "Setting aside" in log and expect in log.split("Setting aside", 1)[1].splitlines()[0], log
    assert "Resuming" not in log and "not retraining" not in log
    assert sha256(out / "checkpoint.pt") != sha256(trained / "checkpoint.pt")
    assert len(pd.read_csv(out / "live/plots/metrics/train_loss.tsv", sep="\t")) == CFG.epochs


def test_other_library_builds_and_rounded_pixels_reuse_the_finished_model(small, trained, tmp_path, caplog):
    """A model trained with another torch/timm/numpy/Pillow build (a Kaggle notebook's) on a cache whose resampling
    rounded differently is the same model: reused, the builds named in the log."""
    out = tmp_path / "fold0"
    shutil.copytree(trained, out)
    root = tmp_path / "copy"
    shutil.copytree(small, root)
    images = np.load(root / "prepared/images.npy")
    images[:, :, :, 0] = np.clip(images[:, :, :, 0].astype(int) + (np.arange(images.shape[2]) % 2), 0, 255)
    np.save(root / "prepared/images.npy", images)  # odd columns one level brighter in red: build-level rounding
    for name in ("last.pt", "checkpoint.pt"):
        ck = torch.load(out / name, weights_only=True)
        ck["fingerprint"]["measured"]["builds"]["torch"] = "2.11.0+cu128"
        torch.save(ck, out / name)
    with caplog.at_level(logging.INFO):
        run(root, out)
    assert "not retraining" in caplog.text and "Setting aside" not in caplog.text, caplog.text
    assert "torch 2.11.0+cu128 -> " in caplog.text


def test_the_training_code_digest_ignores_comments_docstrings_imports_and_order():
    plain = "import os\n\ndef f(x):\n    return x + 1\n"
    noisy = '"""A module."""\nfrom pathlib import Path\n\n\ndef f(x):  # why\n    """Add one."""\n    return x + 1\n'
    assert checkpoints._code_only(plain) == checkpoints._code_only(noisy)
    assert checkpoints._code_only(plain) != checkpoints._code_only(plain.replace("+ 1", "+ 2"))
    assert len(checkpoints.code_digest()) == 64


def test_a_killed_run_resumes_with_the_same_inputs(small, tmp_path, caplog, monkeypatch):
    out = tmp_path / "fold0"
    real_log_live = engine._log_live

    def killed(live, metrics):
        raise KeyboardInterrupt  # after epoch 1's last.pt is written, as a Ctrl-C would

    monkeypatch.setattr(engine, "_log_live", killed)
    with pytest.raises(KeyboardInterrupt):
        run(small, out)
    # to resume from; no RNG state: fit seeds every epoch from (train.seed, epoch, rank)
    assert {"model", "ema", "opt"} <= set(torch.load(out / "last.pt", weights_only=True))
    monkeypatch.setattr(engine, "_log_live", real_log_live)
    with caplog.at_level(logging.INFO):
        run(small, out)
    assert "Resuming from" in caplog.text and "after epoch 1" in caplog.text and "Setting aside" not in caplog.text
    assert len(pd.read_csv(out / "live/plots/metrics/train_loss.tsv", sep="\t")) == CFG.epochs
    # Finished: last.pt only says so (no weights, EMA or optimizer moments to copy into DVC's cache).
    assert set(torch.load(out / "last.pt", weights_only=False)) == {"fingerprint", "state"}
    assert (out / "last.pt").stat().st_size < (out / "checkpoint.pt").stat().st_size / 10


def test_an_old_last_pt_without_fingerprint_is_set_aside(small, trained, tmp_path, caplog):
    out = tmp_path / "fold0"
    shutil.copytree(trained, out)
    old = torch.load(out / "last.pt", weights_only=False)
    old.pop("fingerprint")
    torch.save(old, out / "last.pt")
    with caplog.at_level(logging.INFO):
        run(small, out, cfg=replace(CFG, epochs=1))
    assert "no fingerprint" in caplog.text


def fake_teacher(models: Path, fold: int, fingerprint: dict, images_per_s: float = 100.0) -> None:
    """A resnet10t fold checkpoint as the train stage writes it: its fingerprint, kept epoch and a timing."""
    path = models / "resnet10t" / f"fold{fold}" / "checkpoint.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(fold)
    save_checkpoint(path, create_model("resnet10t"), arch="resnet10t", params={}, epoch=3,
                    metric={"val_roc_auc": 0.9, "images_per_s": images_per_s}, extra={"fingerprint": fingerprint})


@pytest.fixture(scope="module")
def few_cells(nndl_prepared, tmp_path_factory) -> Path:
    """A prepared cache of 400 training, 40 test and 40 hidden cells of the real sample, for quick students."""
    out = tmp_path_factory.mktemp("few") / "prepared"
    out.mkdir()
    index = nndl_prepared.index
    rows = np.concatenate([np.flatnonzero(index["split"] == s)[:n] for s, n in (("train", 400), ("test", 40),
                                                                                 ("hidden", 40))])
    index.iloc[rows].to_csv(out / "index.csv", index=False)
    np.save(out / "images.npy", nndl_prepared.images[rows])
    return out


def fake_ensemble(d: Path, prepared: Path, noise: float = 0.0, method: str = "mean", threshold: float = 0.5) -> Path:
    """The ensemble folder distill reads: OOF soft targets (labels softened to 0.1/0.9, plus uniform noise of
    `noise`, as a GPU's re-prediction gives) and scores.json with the blend and threshold chosen."""
    d.mkdir(exist_ok=True)
    index = pd.read_csv(prepared / "index.csv", dtype={"img_name": str})
    train = index[index["split"] == "train"]
    soft = np.where(train["label"].to_numpy() == 1, 0.9, 0.1)
    soft = soft + np.random.default_rng(1).uniform(-noise, noise, len(soft))
    pd.DataFrame({"img_name": train["img_name"], "ensemble_tta": soft}).to_csv(d / "oof.csv", index=False)
    m = {"accuracy": 0.5, "roc_auc": 0.5, "log_loss": 1.0}
    blend = {"method": method, "weights": {"resnet10t": 1.0}, "cv_log_loss": {"mean": 0.2 + noise},
             "threshold": threshold}
    (d / "scores.json").write_text(json.dumps({"blend": {"ensemble": blend, "ensemble_tta": blend},
                                               "metrics": {"ensemble": {"test": m}, "ensemble_tta": {"test": m}},
                                               "refit": {"on": False}}))
    return d


def test_the_student_is_keyed_on_what_its_targets_come_from_not_their_float_values(few_cells, tmp_path, caplog):
    out, models, ensemble = tmp_path / "student", tmp_path / "models", tmp_path / "ensemble"
    kwargs = dict(student=ModelSpec("resnet10t", weights_dir=""),
                  recipe=Recipe(alpha=0.5, temperature=2.0, teacher_column="ensemble_tta", unlabelled="none",
                                label_noise="keep", timing_images=8),
                  cfg=replace(CFG, epochs=1, select_best=False), aug=AugParams(), tta=TTASpec(("identity",), 0.875),
                  params={"test": True}, learned={"distill.alpha": 0.5}, backbones=["resnet10t"])
    teachers = {k: checkpoints.fingerprint({"model.fold": k}, {"images.npy": "abc"}) for k in (0, 1)}
    for k, f in teachers.items():
        fake_teacher(models, k, f)

    def again(**ensemble_kwargs) -> str:
        caplog.clear()
        with caplog.at_level(logging.INFO):
            distill(few_cells, fake_ensemble(ensemble, few_cells, **ensemble_kwargs), models, out, **kwargs)
        return caplog.text

    again()
    first = sha256(out / "checkpoint.pt")
    # The teachers re-predicted with ~1e-3 of noise, their checkpoints rewritten with other timings: the same targets.
    for k, f in teachers.items():
        fake_teacher(models, k, f, images_per_s=123.4)
    log = again(noise=1e-3)
    assert "not retraining" in log and "Setting aside" not in log and sha256(out / "checkpoint.pt") == first
    # Another blend and threshold chosen: retrained, saying so.
    log = again(method="weighted", threshold=0.42)
    reason = log.split("Setting aside", 1)[1].splitlines()[0] if "Setting aside" in log else log
    assert "ensemble.blend: 'mean' -> 'weighted'" in reason and "ensemble.threshold: 0.5 -> 0.42" in reason, reason
    second = sha256(out / "checkpoint.pt")
    assert second != first
    # A teacher trained on other inputs (its fingerprint changed): retrained, naming it.
    fake_teacher(models, 1, checkpoints.fingerprint({"model.fold": 1}, {"images.npy": "def"}))
    log = again(method="weighted", threshold=0.42)
    reason = log.split("Setting aside", 1)[1].splitlines()[0] if "Setting aside" in log else log
    assert "teacher.resnet10t/fold1.fingerprint" in reason and "fold0" not in reason, reason
    assert sha256(out / "checkpoint.pt") != second
