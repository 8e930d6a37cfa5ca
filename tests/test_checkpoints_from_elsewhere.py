"""Checkpoints from elsewhere (issue 41): a torch floor without known weights-only bypasses, an older torch refusing
files the pipeline did not write, set-aside files renamed (never deleted, never piling up), damaged or incompatible
files as one message, and a model trained under one timm reused under another really installed one."""
from __future__ import annotations

import json
import logging
import os
import pathlib
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import timm
import torch

from pipeline.lib import checkpoints, weights_only
from pipeline.lib.checkpoints import load_checkpoint, resume_state, save_checkpoint, set_aside
from pipeline.lib.common import PipelineError
from pipeline.lib.models import create_model, read_weights
from pipeline.lib.weights_only import TRUST_ENV, ForeignCheckpoint, read_checkpoint

ROOT = Path(__file__).resolve().parents[1]
ARCH = "resnet10t"


def own_checkpoint(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, create_model(ARCH).eval(), arch=ARCH, params={"img_size": 32}, epoch=1, metric={})
    return path


class WritesMarker:
    """Unpickling this touches a file: the stand-in for a stranger's code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


# ---------------------------------------------------------------------------------------------------------------------
# torch: a floor without known weights-only bypasses; an older torch already installed refuses foreign files
# ---------------------------------------------------------------------------------------------------------------------

def floor(requirement: str) -> tuple[int, ...]:
    line = next(l for l in (ROOT / "requirements.txt").read_text().splitlines() if re.match(rf"{requirement}\s*>=", l))
    return tuple(int(x) for x in re.search(r">=\s*([\d.]+)", line).group(1).split("."))


def test_requirements_exclude_torch_with_known_weights_only_bypasses():
    # CVE-2025-32434 (torch <= 2.5.1 runs code with weights_only=True), CVE-2026-24747 (< 2.10 corrupts memory)
    assert floor("torch") >= (2, 10) and floor("torchvision") >= (0, 25)
    assert weights_only.SAFE_TORCH == "2.10" and torch.__version__ >= weights_only.SAFE_TORCH


@pytest.fixture
def old_torch(tmp_path, monkeypatch):
    """As if the installed torch were older than the safe floor (a Kaggle or Colab image's own), with a fresh ledger."""
    monkeypatch.setattr(weights_only, "SAFE_TORCH", "99.0")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(TRUST_ENV, raising=False)
    assert not weights_only.torch_is_safe()


def test_an_older_torch_loads_its_own_checkpoints_and_refuses_foreign_ones(old_torch, tmp_path, monkeypatch, caplog):
    own = own_checkpoint(tmp_path / "own" / "checkpoint.pt")
    model, ck = load_checkpoint(own)  # written here, by save_checkpoint: in the ledger
    assert ck["arch"] == ARCH
    foreign = tmp_path / "kaggle" / "checkpoint.pt"
    foreign.parent.mkdir()
    torch.save(torch.load(own, weights_only=True), foreign)  # the same content, written by someone else's torch.save
    with pytest.raises(ForeignCheckpoint) as e:
        load_checkpoint(foreign)
    message = str(e.value)
    assert str(foreign) in message and "not written by this pipeline on this machine" in message
    assert "CVE-2025-32434" in message and f"torch {weights_only.SAFE_TORCH} or newer" in message
    assert f"{TRUST_ENV}=1" in message
    weights = tmp_path / "weights" / f"{ARCH}.pth"  # pretrained weights from elsewhere: refused the same way
    weights.parent.mkdir()
    torch.save(create_model(ARCH).state_dict(), weights)
    with pytest.raises(ForeignCheckpoint):
        read_weights(weights)
    # A foreign last.pt is set aside (renamed, with the checkpoint.pt beside it), never loaded.
    last = foreign.with_name("last.pt")
    torch.save({"payload": WritesMarker(tmp_path / "code-ran")}, last)
    with caplog.at_level(logging.WARNING):
        assert resume_state(last, checkpoints.fingerprint({}, {})) is None
    assert "not written by this pipeline" in caplog.text and not last.exists() and not foreign.exists()
    assert not (tmp_path / "code-ran").exists()
    # With the switch, the user's trust loads it.
    monkeypatch.setenv(TRUST_ENV, "1")
    assert read_checkpoint(next((foreign.parent / "set-aside").glob("checkpoint.*.pt")))["arch"] == ARCH


# ---------------------------------------------------------------------------------------------------------------------
# Set aside: renamed with the reason, bounded; the checkpoint.pt a retrain would overwrite too
# ---------------------------------------------------------------------------------------------------------------------

def test_set_aside_renames_with_its_reason_and_keeps_the_newest_two(tmp_path, caplog):
    fold = tmp_path / "fold0"
    fold.mkdir()
    for run in range(4):
        (fold / "last.pt").write_bytes(f"last {run}".encode())
        (fold / "checkpoint.pt").write_bytes(f"checkpoint {run}".encode())
        with caplog.at_level(logging.WARNING):
            set_aside(fold / "last.pt", [f"reason {run}"])
        assert not (fold / "last.pt").exists() and not (fold / "checkpoint.pt").exists()
    aside = fold / "set-aside"
    for name in ("last", "checkpoint"):
        kept = sorted(aside.glob(f"{name}.*.pt"))
        assert [p.read_bytes() for p in kept] == [f"{name} 2".encode(), f"{name} 3".encode()]
        assert [p.with_name(f"{p.stem}.why.txt").read_text().split(": ", 1)[1] for p in kept] == [
            "reason 2\n", "reason 3\n"]
    assert len(list(aside.iterdir())) == 2 * 2 * 2 + 1  # two of each file with its reason, and a .gitignore
    assert "Setting aside" in caplog.text and "reason 3" in caplog.text and str(aside) in caplog.text


def test_an_untrusted_last_pt_is_kept_aside_for_someone_who_trusts_it(tmp_path, monkeypatch):
    monkeypatch.delenv(TRUST_ENV, raising=False)
    last = tmp_path / "fold0" / "last.pt"
    last.parent.mkdir()
    torch.save({"payload": WritesMarker(tmp_path / "code-ran")}, last)
    assert resume_state(last, checkpoints.fingerprint({}, {})) is None
    kept = list((last.parent / "set-aside").glob("last.*.pt"))
    assert len(kept) == 1 and "not weights only" in kept[0].with_name(f"{kept[0].stem}.why.txt").read_text()
    assert not (tmp_path / "code-ran").exists()


def test_a_checkpoint_without_its_last_pt_is_moved_aside_not_overwritten(tmp_path, caplog):
    ckpt = own_checkpoint(tmp_path / "fold0" / "checkpoint.pt")
    data = ckpt.read_bytes()
    with caplog.at_level(logging.WARNING):
        assert resume_state(ckpt.with_name("last.pt"), checkpoints.fingerprint({}, {})) is None
    assert not ckpt.exists() and "Moving" in caplog.text
    assert [p.read_bytes() for p in (ckpt.parent / "set-aside").glob("checkpoint.*.pt")] == [data]


# ---------------------------------------------------------------------------------------------------------------------
# Damaged or incompatible: one message
# ---------------------------------------------------------------------------------------------------------------------

def test_a_truncated_checkpoint_is_one_message(tmp_path):
    ckpt = own_checkpoint(tmp_path / "checkpoint.pt")
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    with pytest.raises(PipelineError, match=r"checkpoint\.pt cannot be read: it is truncated or damaged"):
        load_checkpoint(ckpt)
    ckpt.write_bytes(b"")
    with pytest.raises(PipelineError, match="truncated or damaged"):
        read_checkpoint(ckpt)


def test_weights_this_timm_cannot_load_are_one_message(tmp_path):
    ckpt = own_checkpoint(tmp_path / "checkpoint.pt")
    ck = torch.load(ckpt, weights_only=True)
    ck["state_dict"]["fc.weight_renamed"] = ck["state_dict"].pop("fc.weight")  # as another timm might name it
    ck["fingerprint"] = {"measured": {"builds": {"timm": "0.9.16"}}}
    torch.save(ck, ckpt)
    with pytest.raises(PipelineError) as e:
        load_checkpoint(ckpt)
    message = str(e.value)
    assert f"timm {timm.__version__} cannot load this {ARCH}'s weights (trained with timm 0.9.16)" in message
    assert "fc.weight" in message and "pip install timm==0.9.16" in message and "\n" not in message


# ---------------------------------------------------------------------------------------------------------------------
# Two really installed timm versions, both allowed by requirements.txt: a finished model is reused across them
# ---------------------------------------------------------------------------------------------------------------------

TRAIN = """
import json, logging, sys
from pathlib import Path
import timm
from pipeline.lib.common import setup_logging
import pipeline
from pipeline.lib.models import ModelSpec
from pipeline.lib.params import load_params
from pipeline.lib.teachers import Teacher, train_all
from pipeline.lib.training import train_config
from pipeline.lib.transforms import AugParams
from pipeline.lib.tta import TTASpec
setup_logging()
prepared, out = Path(sys.argv[1]), Path(sys.argv[2])
teacher = Teacher(ModelSpec("resnet10t"), AugParams(affine=0, color=0, blur=0, noise=0, dropout=0),
                  TTASpec(("identity",), 0.875), {"timm test": 1}, {"img_size": 32})
params = load_params(Path(pipeline.__file__).resolve().parents[1] / "params.yaml")
cfg = train_config(params["train"], 3, epochs=1, batch_size=8, num_workers=0, device="cpu")
train_all(prepared, out, teacher, cfg=cfg)
print(json.dumps({"timm": timm.__version__, "file": timm.__file__}))
"""


@pytest.fixture(scope="module")
def other_timm(tmp_path_factory) -> Path:
    """Another timm release that requirements.txt allows (>= 1.0.15, < 2), installed with pip into its own folder."""
    version = "1.0.15" if timm.__version__ != "1.0.15" else "1.0.20"
    target = tmp_path_factory.mktemp("timm_other")
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                        f"timm=={version}"], capture_output=True, text=True, timeout=300)
    if r.returncode:
        pytest.skip(f"pip could not install timm=={version} (no package index?): {r.stderr[-300:]}")
    return target


def train_with(timm_dir: Path | None, prepared: Path, out: Path) -> tuple[dict, str]:
    """train_all in a fresh process, with timm from `timm_dir` (None: this environment's); its result and log."""
    path = os.pathsep.join([*([str(timm_dir)] if timm_dir else []), str(ROOT)])
    r = subprocess.run([sys.executable, "-c", TRAIN, str(prepared), str(out)], capture_output=True, text=True,
                       timeout=600, env={**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1",
                                         "NO_ALBUMENTATIONS_UPDATE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1]), r.stderr


def test_a_model_trained_under_one_timm_is_reused_under_the_other(other_timm, make_competition, download_prepare,
                                                                  tmp_path):
    p = download_prepare(make_competition(), tmp_path / "work", img_size=32)
    for first, second in ((other_timm, None), (None, other_timm)):
        out = tmp_path / f"model_{'other' if first else 'this'}_first"
        made, log = train_with(first, p.out, out)
        assert "not retraining" not in log
        test = pd.read_csv(out / "test.csv")
        used, log = train_with(second, p.out, out)
        assert made["timm"] != used["timm"] and str(other_timm) in (made["file"] if first else used["file"])
        assert "Already finished" in log and "not retraining" in log and "Setting aside" not in log, log[-3000:]
        assert f"timm {made['timm']} -> {used['timm']}" in log, log[-3000:]
        pd.testing.assert_frame_equal(pd.read_csv(out / "test.csv"), test)  # re-predicted under the other timm
