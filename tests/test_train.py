"""Training on real cells: it learns, resumes after an interruption, skips finished work, and is deterministic."""
from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.lib.dataset import CellDataset, load_cache, targets
from pipeline.download import download
from pipeline.lib.engine import InferConfig, fit
from pipeline.folds import make_folds
from pipeline.lib.losses import LabelLoss
from pipeline.lib.models import ModelSpec, create_model, data_config
from pipeline.prepare import prepare
from pipeline.lib.teachers import Teacher, train_fold
from pipeline.lib.transforms import AugParams, build_transform
from pipeline.lib.tta import TTASpec
from helpers import train_cfg


@pytest.fixture(scope="module")
def real64(shared_data, tmp_path_factory) -> Path:
    """The real competition sample, prepared at 64 px."""
    root = tmp_path_factory.mktemp("real64")
    download(root / "raw", source="local", path=str(shared_data / "nndl-hw2-sample.zip"), competition="",
             dataset="", synthetic={}, seed=0)
    prepare(root / "raw", root / "prepared", img_size=64, holdout_fraction=0.15, seed=0)
    return root / "prepared"


def subset_folds(prepared: Path, out: Path, n_images: int, n_folds: int = 3, seed: int = 0) -> Path:
    """A folds CSV over the first slides' images only, so a test trains on a small, grouped subset."""
    index = pd.read_csv(prepared / "index.csv")
    train = index[index["split"] == "train"]
    keep = train["group"].isin(train["group"].drop_duplicates().sample(frac=1, random_state=seed))
    sub = train[keep].sample(frac=1, random_state=seed).head(n_images)
    folds = make_folds(sub.assign(split="train"), n=n_folds, group_by="patient", seed=seed)
    folds.to_csv(out, index=False)
    return out


def run_fold(prepared, folds_csv, out, cfg, views=("identity",)):
    teacher = Teacher(ModelSpec("resnet10t", weights_dir=""), AugParams(), TTASpec(tuple(views), 0.875), {},
                      {"test": True})
    return train_fold(prepared, folds_csv, out, teacher, fold=0, cfg=cfg)


def test_tiny_backbone_learns_real_cells(real64, tmp_path):
    folds_csv = subset_folds(real64, tmp_path / "folds.csv", n_images=1500)
    cfg = train_cfg(epochs=5, batch_size=32, lr=2e-3, patience=5, num_workers=1, device="cpu", seed=1)
    best = run_fold(real64, folds_csv, tmp_path / "m", cfg)
    curve = pd.read_csv(tmp_path / "m/live/plots/metrics/train_loss.tsv", sep="\t")["train_loss"].to_numpy()
    assert curve[-1] < curve[0] - 0.1, f"training loss did not fall: {curve}"
    assert best["val_accuracy"] >= 0.80, best
    oof = pd.read_csv(tmp_path / "m/oof.csv")
    folds = pd.read_csv(folds_csv)
    assert sorted(oof["img_name"]) == sorted(folds.loc[folds["fold"] == 0, "img_name"])
    assert oof["prob"].between(0, 1).all()


class Interrupt(Exception):
    pass


class StopAfter:
    """A dvclive stand-in that kills the run after n epochs, as a Ctrl-C or a lost machine would."""

    def __init__(self, n):
        self.n, self.steps = n, 0

    def log_metric(self, *a, **k):
        pass

    def next_step(self):
        self.steps += 1
        if self.steps == self.n:
            raise Interrupt


class CountingLoss(LabelLoss):
    calls = 0

    def forward(self, logits, target):
        CountingLoss.calls += 1
        return super().forward(logits, target)


def test_resume_after_interruption_and_skip_when_finished(real64, tmp_path, caplog):
    index, images = load_cache(real64)
    rows, val = np.arange(64), np.arange(64, 96)
    labels = index["label"].to_numpy(float)
    cfg = train_cfg(epochs=3, batch_size=32, num_workers=0, device="cpu", seed=3, patience=10)

    def datasets():
        model = create_model("resnet10t")
        tf = lambda train: build_transform(train, AugParams(), **data_config(model))
        return (model, CellDataset(images[rows], targets(labels[rows]), tf(True), seed=cfg.seed),
                CellDataset(images[val], targets(labels[val]), tf(False)))

    model, tr, va = datasets()
    with pytest.raises(Interrupt):
        fit(model, tr, va, labels[val].astype(int), CountingLoss(), cfg, tmp_path, StopAfter(1))
    steps_per_epoch = len(rows) // cfg.batch_size
    assert CountingLoss.calls == steps_per_epoch
    CountingLoss.calls = 0
    model, tr, va = datasets()
    with caplog.at_level(logging.INFO):
        best = fit(model, tr, va, labels[val].astype(int), CountingLoss(), cfg, tmp_path, StopAfter(99))
    assert "Resuming" in caplog.text and "after epoch 1" in caplog.text
    assert CountingLoss.calls == 2 * steps_per_epoch  # epochs 2 and 3 only
    assert best["epoch"] in (1, 2, 3)
    CountingLoss.calls = 0
    model, tr, va = datasets()
    again = fit(model, tr, va, labels[val].astype(int), CountingLoss(), cfg, tmp_path, StopAfter(99))
    assert CountingLoss.calls == 0 and again == best
    # Other params: the old state is not reused.
    model, tr, va = datasets()
    fit(model, tr, va, labels[val].astype(int), CountingLoss(), replace(cfg, epochs=1), tmp_path, StopAfter(99))
    assert CountingLoss.calls == steps_per_epoch


def test_same_seed_gives_identical_oof(real64, tmp_path):
    folds_csv = subset_folds(real64, tmp_path / "folds.csv", n_images=150)
    cfg = train_cfg(epochs=1, batch_size=32, num_workers=1, device="cpu", seed=7)
    run_fold(real64, folds_csv, tmp_path / "a", cfg, views=("identity", "hflip"))
    run_fold(real64, folds_csv, tmp_path / "b", cfg, views=("identity", "hflip"))
    a, b = (pd.read_csv(tmp_path / d / "oof.csv") for d in ("a", "b"))
    pd.testing.assert_frame_equal(a, b)
    run_fold(real64, folds_csv, tmp_path / "c", replace(cfg, seed=8), views=("identity", "hflip"))
    c = pd.read_csv(tmp_path / "c" / "oof.csv")
    assert not np.allclose(a["prob"], c["prob"])


def test_cuda_requested_without_a_gpu_is_a_clear_error():
    import torch

    from pipeline.lib.common import PipelineError
    from pipeline.lib.engine import resolve_device

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible here")
    with pytest.raises(PipelineError, match="train.device"):
        resolve_device("cuda")
    assert resolve_device("auto").type == "cpu"


PLAIN = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}  # a normalisation FakePredict never looks at


class FakePredict:
    """predict() stand-in: the pixels' mean is the probability, so a wrong row or split shows in the CSV."""

    def __init__(self, monkeypatch):
        from pipeline.lib import predictions

        self.calls = []
        monkeypatch.setattr(predictions, "predict", self)

    def __call__(self, model, ds, cfg, device, names, crop_scale, desc="", shard=False):
        self.calls.append(desc)
        return np.repeat(ds.images.reshape(len(ds), -1).mean(1, keepdims=True) / 255, len(names), axis=1)


def test_public_layout_hidden_set_is_predicted_once(download_prepare, tmp_path, monkeypatch):
    """The public layout's hidden set is its test holdout: one pass serves test.csv and hidden.csv."""
    from pipeline.lib.predictions import write_split_predictions

    fake, cfg = FakePredict(monkeypatch), InferConfig(device="cpu")
    public = download_prepare(Path(__file__).resolve().parents[1] / "data" / "demo.zip", tmp_path / "public")
    out = tmp_path / "out"
    out.mkdir()
    tables = write_split_predictions(None, public.images, public.index, out, cfg, TTASpec(), PLAIN)
    assert fake.calls == ["test"]
    assert (out / "hidden.csv").read_bytes() == (out / "test.csv").read_bytes()
    hidden = public.index[public.index["split"] == "hidden"]
    assert tables["hidden"]["img_name"].tolist() == hidden["img_name"].tolist()
    np.testing.assert_allclose(tables["hidden"]["prob"], public.images[hidden.index].reshape(len(hidden), -1).mean(1)
                               / 255, atol=1e-6)

    fake.calls.clear()  # the same names with another content digest are other images: predicted again
    changed = public.index.copy()
    changed.loc[hidden.index[0], "hash"] = "0" * 40
    write_split_predictions(None, public.images, changed, out, cfg, TTASpec(), PLAIN)
    assert fake.calls == ["test", "hidden"]


def test_competition_hidden_set_is_predicted_on_its_own(nndl_prepared, tmp_path, monkeypatch):
    """The competition bundle's hidden set is its own images: both splits are predicted."""
    from pipeline.lib.predictions import write_split_predictions

    fake = FakePredict(monkeypatch)
    tables = write_split_predictions(None, nndl_prepared.images, nndl_prepared.index, tmp_path, InferConfig(
        device="cpu"), TTASpec(), PLAIN)
    assert fake.calls == ["test", "hidden"]
    assert set(tables["hidden"]["img_name"]).isdisjoint(tables["test"]["img_name"])


def test_each_trained_epoch_logs_its_seconds_and_the_time_left(monkeypatch, caplog):
    """Replayed epochs of a resumed run come at once and are not counted; a trained one says its seconds and an
    estimate of the model's time left (the mean trained epoch times the epochs to come)."""
    from pipeline.lib import training

    clock = iter([0.0, 0.01, 0.02, 10.02, 30.02])
    monkeypatch.setattr(training.time, "perf_counter", lambda: next(clock))
    seen = []
    live = type("Live", (), {"log_metric": lambda self, k, v: seen.append(k),
                             "next_step": lambda self: seen.append("|")})
    progress = training.EpochProgress(live(), "resnet10t fold 1", epochs=5, early_stop=True)
    with caplog.at_level(logging.INFO, logger="pipeline.lib.training"):
        for _ in range(4):
            progress.log_metric("train_loss", 0.5)
            progress.next_step()
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["resnet10t fold 1: epoch 3/5 took 10 s; at most 0.3 min left for this model",
                     "resnet10t fold 1: epoch 4/5 took 20 s; at most 0.2 min left for this model"]
    assert seen == ["train_loss", "|"] * 4  # everything still reaches dvclive
