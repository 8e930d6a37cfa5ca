"""Training switches: mixup/CutMix targets, stochastic depth, progressive resizing in the loop."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.lib import batch_aug
from pipeline.lib.dataset import CellDataset, targets
from pipeline.lib.engine import fit
from pipeline.lib.losses import DistillLoss, LabelLoss
from pipeline.lib.models import create_model, data_config
from pipeline.lib.transforms import AugParams, build_transform
from helpers import train_cfg


@pytest.mark.parametrize("mixup,cutmix", [(0.4, 0.0), (0.0, 1.0), (0.4, 1.0)])
def test_mixed_targets_stay_distributions_and_follow_the_pixels(mixup, cutmix):
    rng = np.random.default_rng(0)
    x = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    y = targets(np.array([1, 0, 1, 1, 0, 0, 1, 0]), soft=np.linspace(0.05, 0.95, 8))
    for _ in range(20):
        xm, ym = batch_aug.mix(x, torch.as_tensor(y), mixup, cutmix, rng)
        assert ym.min() >= 0 and ym.max() <= 1  # both columns remain probabilities: [p, 1 - p] sums to 1
        # Each row is lam * own + (1 - lam) * partner (the reversed batch), with one lam for label and teacher.
        partner = torch.as_tensor(np.flip(y, 0).copy())
        lam = (ym[:, 1] - partner[:, 1]) / (torch.as_tensor(y)[:, 1] - partner[:, 1])
        assert torch.allclose(lam, lam[0], atol=1e-5)
        # The pixels mix with the same weight: CutMix keeps a lam share of each image's own pixels, mixup blends
        # every pixel lam : 1 - lam.
        own, pasted = (xm[0] == x[0]).all(0), (xm[0] == x[-1]).all(0)
        cut_ok = bool((own | pasted).all()) and own.float().mean().item() == pytest.approx(lam[0].item(), abs=1e-4)
        d = x[0] - x[-1]
        blended = ((xm[0] - x[-1]) * d).sum().item() / (d * d).sum().item()  # least squares: stable for any x
        mix_ok = blended == pytest.approx(lam[0].item(), abs=1e-3)
        assert (cut_ok if mixup == 0 else mix_ok if cutmix == 0 else cut_ok or mix_ok), (lam[0], own.float().mean())
        for loss in (LabelLoss(0.05), DistillLoss(0.5, 2.0, 0.05)):
            assert torch.isfinite(loss(torch.randn(8, 2), ym))


def test_no_mixing_when_both_are_off():
    x, y = torch.rand(4, 3, 8, 8), torch.rand(4, 2)
    xm, ym = batch_aug.mix(x, y, 0.0, 0.0, np.random.default_rng(0))
    assert xm is x and ym is y


def test_soft_label_loss_equals_index_loss_for_hard_labels():
    logits, y = torch.randn(6, 2), torch.tensor([0, 1, 1, 0, 1, 0.0])
    expected = torch.nn.functional.cross_entropy(logits, y.long(), label_smoothing=0.1)
    assert torch.allclose(LabelLoss(0.1)(logits, torch.stack([y, y], 1)), expected)


def test_drop_path_changes_the_train_mode_output_only():
    torch.manual_seed(0)
    plain = create_model("resnet18")
    torch.manual_seed(0)
    dropped = create_model("resnet18", drop_path_rate=0.5)
    # timm zero-inits the head and each residual branch's last BatchNorm: give them weights, or nothing is dropped.
    torch.nn.init.normal_(plain.get_classifier().weight)
    for m in plain.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
    dropped.load_state_dict(plain.state_dict())
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(plain.eval()(x), dropped.eval()(x))
        torch.manual_seed(1)
        a = plain.train()(x)
        torch.manual_seed(1)
        b = dropped.train()(x)
    assert not torch.allclose(a, b)


def test_progressive_sizes_ramp_to_full_by_the_middle_epoch():
    assert [batch_aug.progressive_size(e, 6, 64, 0.5) for e in range(1, 7)] == [32, 40, 56, 64, 64, 64]
    assert [batch_aug.progressive_size(e, 4, 64, 1.0) for e in range(1, 5)] == [64] * 4


class SizeSpy(torch.nn.Module):
    """Wraps a model and records the input side of every training forward pass."""

    def __init__(self, model):
        super().__init__()
        self.model, self.sizes = model, []

    def forward(self, x):
        if self.training:
            self.sizes.append(x.shape[-1])
        return self.model(x)


def test_the_loop_feeds_the_progressive_sizes_from_the_one_cache(tmp_path):
    images = np.random.default_rng(0).integers(0, 255, (32, 64, 64, 3), dtype=np.uint8)
    labels = np.arange(32) % 2
    model = create_model("resnet10t")
    tf = build_transform(True, AugParams(), **data_config(model))
    spy = SizeSpy(model)
    cfg = train_cfg(epochs=4, batch_size=16, num_workers=0, device="cpu", progressive=0.5, select_best=False,
                      precision="fp32", mixup=0.2, cutmix=1.0)
    fit(spy, CellDataset(images, targets(labels), tf), None, None, LabelLoss(), cfg, tmp_path)
    assert spy.sizes == [32, 32, 48, 48, 64, 64, 64, 64]  # 2 steps per epoch
