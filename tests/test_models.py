"""create_model (offline pretrained weights) and checkpoints (pipeline.lib.models), on resnet10t at 32x32."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import timm
import torch

from pipeline.lib.common import PipelineError
from pipeline.lib.checkpoints import load_checkpoint, save_checkpoint
from pipeline.lib.models import NUM_CLASSES, create_model

ARCH = "resnet10t"


def inputs(n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def imagenet_state() -> dict:
    """A resnet10t state dict with a 1000-class head, standing in for downloaded ImageNet weights."""
    torch.manual_seed(123)
    return {k: v.clone() for k, v in timm.create_model(ARCH, num_classes=1000).state_dict().items()}


def test_create_model_has_two_logits():
    model = create_model(ARCH).eval()
    with torch.no_grad():
        out = model(inputs(3))
    assert NUM_CLASSES == 2
    assert out.shape == (3, 2)
    assert model.get_classifier().out_features == 2


def test_create_model_passes_drop_rate():
    assert create_model(ARCH, drop_rate=0.3).drop_rate == pytest.approx(0.3)


@pytest.mark.parametrize("arch", ["resnet_does_not_exist", "ResNet10t"])
def test_unknown_arch_is_a_pipeline_error_naming_it(arch):
    with pytest.raises(PipelineError, match=repr(arch)):
        create_model(arch)


def test_pretrained_offline_without_weights_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    empty = tmp_path / "weights"
    empty.mkdir()
    start = time.perf_counter()
    with pytest.raises(PipelineError) as e:
        create_model(ARCH, pretrained=True, weights_dir=empty)
    assert time.perf_counter() - start < 5
    msg = str(e.value)
    assert "train.pretrained" in msg
    assert "weights_dir" in msg
    assert str(empty) in msg
    assert f"{ARCH}.safetensors" in msg


def test_pretrained_offline_without_weights_dir_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(PipelineError, match="train.pretrained"):
        create_model(ARCH, pretrained=True, weights_dir=None)
    assert time.perf_counter() - start < 5


def _save(state: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)


@pytest.mark.parametrize("name", [f"{ARCH}.pth", f"{ARCH}.safetensors", f"{ARCH}/model.safetensors"])
def test_pretrained_from_a_local_file(tmp_path, monkeypatch, imagenet_state, name):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _save(imagenet_state, tmp_path / "weights" / name)
    model = create_model(ARCH, pretrained=True, weights_dir=tmp_path / "weights")
    state = model.state_dict()
    backbone = [k for k in imagenet_state if not k.startswith("fc.")]
    assert "conv1.0.weight" in backbone
    for k in backbone:
        torch.testing.assert_close(state[k], imagenet_state[k], rtol=0, atol=0, msg=k)
    # A fresh 2-class head instead of the file's 1000-class one.
    assert state["fc.weight"].shape == (2, imagenet_state["fc.weight"].shape[1])
    assert imagenet_state["fc.weight"].shape[0] == 1000
    with torch.no_grad():
        assert model.eval()(inputs()).shape == (2, 2)


def test_without_pretrained_the_local_file_is_ignored(tmp_path, imagenet_state):
    _save(imagenet_state, tmp_path / f"{ARCH}.pth")
    model = create_model(ARCH, pretrained=False, weights_dir=tmp_path)
    assert not torch.equal(model.state_dict()["conv1.0.weight"], imagenet_state["conv1.0.weight"])


def test_pretrained_from_a_corrupt_pth_is_a_pipeline_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / f"{ARCH}.pth").write_bytes(b"not a checkpoint" * 64)
    with pytest.raises(PipelineError, match="train.weights_dir"):
        create_model(ARCH, pretrained=True, weights_dir=tmp_path)


def test_pretrained_from_weights_of_another_arch_is_a_pipeline_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    other = timm.create_model("resnet18", num_classes=1000).state_dict()
    torch.save(other, tmp_path / f"{ARCH}.pth")
    with pytest.raises(PipelineError, match=f"Loading pretrained weights for {ARCH} failed"):
        create_model(ARCH, pretrained=True, weights_dir=tmp_path)


def test_pretrained_from_a_corrupt_safetensors_is_a_pipeline_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # e.g. a Git LFS pointer committed instead of the weights
    (tmp_path / f"{ARCH}.safetensors").write_text("version https://git-lfs.github.com/spec/v1\n"
                                                   "oid sha256:0123\nsize 20000000\n")
    with pytest.raises(PipelineError, match="train.weights_dir"):
        create_model(ARCH, pretrained=True, weights_dir=tmp_path)


# --- checkpoints --------------------------------------------------------------------------------------------------

def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = create_model(ARCH, drop_rate=0.1)
    model.train()
    with torch.no_grad():
        model(inputs(4, seed=1))  # move the BatchNorm running statistics away from their defaults
        torch.nn.init.normal_(model.get_classifier().weight)  # the head starts at zero: give it trained-like weights
    model.eval()
    x = inputs()
    with torch.no_grad():
        expected = model(x)
    params = {"train": {"lr": 0.002}, "img_size": 32}
    metric = {"val_roc_auc": 0.97, "epoch": 3}
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, model, arch=ARCH, params=params, epoch=3, metric=metric, extra={"fold": 1})

    rebuilt, ckpt = load_checkpoint(path)
    assert not rebuilt.training
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), expected, rtol=0, atol=1e-6)
        fresh = create_model(ARCH).eval()(x)
    assert not torch.allclose(fresh, expected, atol=1e-4)  # the rebuilt model's output comes from the weights
    assert {"arch", "params", "epoch", "metric", "data_config", "state_dict"} <= set(ckpt)
    assert ckpt["arch"] == ARCH
    assert ckpt["params"] == params
    assert ckpt["epoch"] == 3
    assert ckpt["metric"] == metric
    assert ckpt["fold"] == 1
    assert set(ckpt["data_config"]) == {"mean", "std"}
    assert len(ckpt["data_config"]["mean"]) == len(ckpt["data_config"]["std"]) == 3
    assert set(ckpt["state_dict"]) == set(model.state_dict())


def test_load_checkpoint_missing_file_names_it(tmp_path):
    path = tmp_path / "models" / "resnet10t" / "fold0" / "checkpoint.pt"
    with pytest.raises(PipelineError, match="checkpoint.pt is missing") as e:
        load_checkpoint(path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("arch", ["efficientnet_b0", "tf_efficientnetv2_b0"])
def test_residual_blocks_of_a_new_efficientnet_start_as_the_identity(arch):
    model = create_model(arch).eval()
    blocks = [m for m in model.modules() if getattr(m, "has_skip", False)]
    assert len(blocks) >= 5
    with torch.no_grad():
        for block in blocks:
            channels = next(c for c in block.modules() if isinstance(c, torch.nn.Conv2d)).in_channels
            x = torch.randn(2, channels, 6, 6)
            torch.testing.assert_close(block(x), x)  # the skip alone: training starts from a shallow network
    raw = next(m for m in timm.create_model(arch).eval().modules() if getattr(m, "has_skip", False))
    with torch.no_grad():  # timm's own init does not: the test would see it
        x = torch.randn(2, next(c for c in raw.modules() if isinstance(c, torch.nn.Conv2d)).in_channels, 6, 6)
        assert not torch.allclose(raw(x), x)
