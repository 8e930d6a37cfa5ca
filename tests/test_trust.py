"""No checkpoint or weights file from someone else runs code: every read site loads weights only, or says why not."""
from __future__ import annotations

import json
import logging
import pathlib
import re
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from pipeline.lib import checkpoints
from pipeline.lib import distributed as ddp
from pipeline.lib import engine
from pipeline.lib.checkpoints import load_checkpoint, save_checkpoint
from pipeline.lib.common import PipelineError
from pipeline.lib.dataset import CellDataset, targets
from pipeline.distill import inference_ms
from pipeline.export import export
from pipeline.lib.losses import LabelLoss
from pipeline.lib.models import create_model, data_config, read_weights
from pipeline.lib.params import load_params
from pipeline.predict import ensemble_probs, image_size
from pipeline.train import refit_epochs
from pipeline.lib.training import train_logged
from pipeline.lib.transforms import AugParams, build_transform
from pipeline.lib.tta import TTASpec
from pipeline.lib.weights_only import TRUST_ENV, UntrustedCheckpoint, read_checkpoint
from helpers import train_cfg

ROOT = Path(__file__).resolve().parents[1]
ARCH = "resnet10t"
CFG = train_cfg(epochs=1, batch_size=8, ema_decay=0, select_best=False, num_workers=0, device="cpu")


class WritesMarker:
    """Unpickling this calls Path.touch(marker): the stand-in for whatever code a stranger's file runs."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def plant(path: Path, marker: Path, like: dict | None = None) -> Path:
    """At `path`, what a file from someone else could be: a real file's entries (`like`) plus one whose unpickling
    writes `marker`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({**(like or {}), "payload": WritesMarker(marker)}, path)
    return path


@pytest.fixture
def marker(tmp_path) -> Path:
    path = tmp_path / "code-ran"
    yield path
    assert not path.exists(), "the planted file's code ran"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> dict:
    """The entries of a checkpoint save_checkpoint writes (untrained resnet10t, 32 px)."""
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint.pt"
    save_checkpoint(path, create_model(ARCH).eval(), arch=ARCH, params={"img_size": 32}, epoch=1, metric={})
    return torch.load(path, weights_only=True)


def tiny_dataset(n: int = 8) -> CellDataset:
    images = np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    norm = data_config(create_model(ARCH))
    return CellDataset(images, targets(np.arange(n) % 2.0), build_transform(False, AugParams(), **norm))


def test_the_planted_file_runs_its_code_when_unpickled_in_full(tmp_path):
    """The attack the other tests defend against is real: full unpickling (torch.load weights_only=False) runs it."""
    path = plant(tmp_path / "checkpoint.pt", tmp_path / "code-ran")
    torch.load(path, weights_only=False)
    assert (tmp_path / "code-ran").exists()


def test_resume_sets_aside_a_last_pt_that_is_not_weights_only(tmp_path, marker, caplog):
    current = checkpoints.run_fingerprint(CFG, None)
    last = plant(tmp_path / "last.pt", marker, {"fingerprint": current, "state": {"epoch": 1, "done": False}})
    with caplog.at_level(logging.WARNING):
        assert checkpoints.resume_state(last, current) is None
    line = next(r.getMessage() for r in caplog.records if "Setting aside" in r.getMessage())
    assert str(last) in line and "not weights only" in line and "pathlib" in line, line
    assert not last.exists()


def test_other_ranks_reload_last_pt_weights_only(tmp_path, marker, monkeypatch):
    """Under DDP the ranks other than 0 read the last.pt rank 0 accepted; they too read it weights only."""
    last = plant(tmp_path / "last.pt", marker, {"fingerprint": checkpoints.run_fingerprint(CFG, None)})
    monkeypatch.setattr(ddp, "is_main", lambda: False)
    monkeypatch.setattr(ddp, "broadcast", lambda obj: True)  # rank 0 said: resume from it
    with pytest.raises(UntrustedCheckpoint, match=re.escape(str(last))):
        engine.fit(create_model(ARCH), tiny_dataset(), None, None, LabelLoss(0.0), CFG, tmp_path)


@pytest.mark.parametrize("planted", ["checkpoint.pt", "last.pt"])
def test_reuse_sets_aside_a_fold_that_is_not_weights_only_and_retrains(planted, tmp_path, marker, caplog):
    """The reuse check (training.train_logged) reads both files of a finished fold: a planted one is never run, the
    fold retrains, and the log line names the file and why."""
    out = tmp_path / "fold0"
    out.mkdir()
    p = load_params(ROOT / "params.yaml")  # real params in the checkpoint: plain types, weights-only loadable
    params = {"train": p["train"], "augment": p["augment"], "img_size": 32}
    fingerprint = checkpoints.fingerprint({"model.fold": 0}, {"images.npy": "digest"})
    files = {"checkpoint.pt": {"arch": ARCH, "params": params, "epoch": 1, "metric": {}, "fingerprint": fingerprint,
                               "data_config": data_config(create_model(ARCH)),
                               "state_dict": create_model(ARCH).state_dict()},
             "last.pt": {"fingerprint": checkpoints.run_fingerprint(CFG, fingerprint),
                         "state": {"epoch": 1, "best": {"epoch": 1}, "best_epoch": 1, "bad_epochs": 0, "done": True,
                                   "history": []}}}
    for name, content in files.items():
        plant(out / name, marker, content) if name == planted else torch.save(content, out / name)
    with caplog.at_level(logging.INFO):
        train_logged(create_model(ARCH), ARCH, tiny_dataset(), None, None, LabelLoss(0.0), CFG, out, params,
                     fingerprint)
    line = next(r.getMessage() for r in caplog.records if "Setting aside" in r.getMessage())
    assert str(out / planted) in line and "not weights only" in line, line
    assert "Already finished" not in caplog.text
    # Retrained: the fold's files are the pipeline's own again, weights only.
    assert "payload" not in read_checkpoint(out / "checkpoint.pt")
    assert read_checkpoint(out / "last.pt")["state"]["done"]


def test_refit_refuses_a_fold_checkpoint_that_is_not_weights_only(tmp_path, marker):
    (tmp_path / "fold0").mkdir()
    torch.save({"epoch": 2}, tmp_path / "fold0" / "checkpoint.pt")
    bad = plant(tmp_path / "fold1" / "checkpoint.pt", marker, {"epoch": 3})
    with pytest.raises(UntrustedCheckpoint, match=re.escape(str(bad))) as e:
        refit_epochs(tmp_path, [0, 1])
    assert TRUST_ENV in str(e.value)


def test_ensemble_predict_refuses_a_fold_checkpoint_that_is_not_weights_only(tmp_path, marker, checkpoint,
                                                                                monkeypatch):
    models, ensemble = tmp_path / "models", tmp_path / "ensemble"
    bad = plant(models / ARCH / "fold0" / "checkpoint.pt", marker, checkpoint)
    ensemble.mkdir()
    blend = {"method": "mean", "weights": {ARCH: 1.0}, "threshold": 0.5}
    (ensemble / "scores.json").write_text(json.dumps({"blend": {"ensemble": blend, "ensemble_tta": blend}}))
    monkeypatch.chdir(ROOT)  # params.yaml's tta section
    with pytest.raises(UntrustedCheckpoint, match=re.escape(str(bad))):
        ensemble_probs(np.zeros((2, 32, 32, 3), np.uint8), models, ensemble, False, 8)


def test_predict_refuses_to_read_the_image_size_from_a_checkpoint_that_is_not_weights_only(tmp_path, marker,
                                                                                          checkpoint):
    """`predict --model ensemble` first reads the side to decode images to from a fold checkpoint."""
    bad = plant(tmp_path / "models" / ARCH / "fold0" / "checkpoint.pt", marker, checkpoint)
    with pytest.raises(UntrustedCheckpoint, match=re.escape(str(bad))):
        image_size("ensemble", tmp_path / "export", tmp_path / "models")


def test_distill_refuses_a_teacher_that_is_not_weights_only(tmp_path, marker, checkpoint):
    bad = plant(tmp_path / "models" / ARCH / "fold0" / "checkpoint.pt", marker, checkpoint)
    with pytest.raises(UntrustedCheckpoint, match=re.escape(str(bad))):
        inference_ms([bad], np.zeros((2, 32, 32, 3), np.uint8), CFG, {"plain": ["identity"]}, 0.875)


def test_export_refuses_a_student_that_is_not_weights_only(tmp_path, marker, checkpoint):
    bad = plant(tmp_path / "student" / "checkpoint.pt", marker, checkpoint)
    with pytest.raises(UntrustedCheckpoint, match=re.escape(str(bad))):
        export(tmp_path / "prepared", tmp_path / "student", tmp_path / "export", tta=TTASpec(("identity",), 0.875))
    assert not (tmp_path / "export").exists()


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".bin"])
def test_pretrained_weights_that_are_not_weights_only_are_refused(suffix, tmp_path, marker, monkeypatch):
    """Whatever the installed timm does with a file: timm 1.0.15 (the oldest requirements.txt allows) unpickles
    .pth/.pt/.bin in full (its load_state_dict defaults to weights_only=False), as simulated here."""
    from timm.models import _builder, _helpers

    monkeypatch.setattr(_builder, "load_state_dict",
                        lambda path, *a, **k: _helpers.load_state_dict(path, *a, **{**k, "weights_only": False}))
    weights = plant(tmp_path / "weights" / f"{ARCH}{suffix}", marker,
                    timm.create_model(ARCH, num_classes=1000).state_dict())
    with pytest.raises(UntrustedCheckpoint, match=re.escape(str(weights))):
        create_model(ARCH, pretrained=True, weights_dir=tmp_path / "weights")


def test_pretrained_weights_nested_as_timm_reads_them(tmp_path):
    """A training checkpoint's state_dict (or EMA) entry, DataParallel's `module.` prefix dropped, as timm takes it."""
    state = timm.create_model(ARCH, num_classes=1000).state_dict()
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / f"{ARCH}.pth")
    assert read_weights(tmp_path / f"{ARCH}.pth").keys() == state.keys()
    model = create_model(ARCH, pretrained=True, weights_dir=tmp_path)
    torch.testing.assert_close(model.state_dict()["conv1.0.weight"], state["conv1.0.weight"], rtol=0, atol=0)
    assert "state_dict" not in model.pretrained_cfg  # the file's tensors are not kept beside the model's


def test_a_trusted_file_loads_only_with_the_environment_switch(tmp_path, checkpoint, monkeypatch, caplog):
    """A benign file that is not weights only (a numpy scalar, as an older script might have saved) is refused by
    default and loads with PIPELINE_TRUST_CHECKPOINTS=1, which no params key or fingerprint records."""
    path = tmp_path / "checkpoint.pt"
    torch.save({**checkpoint, "metric": {"val_accuracy": np.float64(0.9)}}, path)
    monkeypatch.delenv(TRUST_ENV, raising=False)
    with pytest.raises(UntrustedCheckpoint, match="numpy") as e:
        load_checkpoint(path)
    assert str(path) in str(e.value) and f"{TRUST_ENV}=1" in str(e.value)
    before = checkpoints.run_fingerprint(CFG, None)
    monkeypatch.setenv(TRUST_ENV, "1")
    with caplog.at_level(logging.WARNING):
        model, ck = load_checkpoint(path)
    assert ck["metric"]["val_accuracy"] == 0.9 and isinstance(model, torch.nn.Module)
    assert str(path) in caplog.text and TRUST_ENV in caplog.text
    assert checkpoints.run_fingerprint(CFG, None) == before
    assert TRUST_ENV not in (ROOT / "params.yaml").read_text()


def test_a_damaged_file_is_named_as_damaged_not_untrusted(tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"not a checkpoint" * 64)
    with pytest.raises(PipelineError, match="damaged") as e:
        load_checkpoint(path)
    assert not isinstance(e.value, UntrustedCheckpoint) and str(path) in str(e.value)
