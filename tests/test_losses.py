"""LabelLoss and DistillLoss (pipeline.lib.losses): targets are (N, 2) rows of [hard label, teacher probability]."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.lib.losses import DistillLoss, LabelLoss


def make_batch(n: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, 2, generator=g) * 2
    labels = torch.tensor([0.0, 1.0] * (n // 2))
    soft = torch.rand(n, generator=g) * 0.9 + 0.05
    return logits, torch.stack([labels, soft], 1)


def teacher_logits(p: torch.Tensor) -> torch.Tensor:
    return torch.stack([torch.zeros_like(p), torch.log(p / (1 - p))], 1)


def hand_kl(student: torch.Tensor, teacher: torch.Tensor, t: float) -> float:
    """KL(teacher_T || student_T), summed over classes, averaged over the batch, in float64 numpy."""
    s, q = student.detach().double().numpy() / t, teacher.detach().double().numpy() / t
    log_ps = s - np.log(np.exp(s).sum(1, keepdims=True))
    log_pt = q - np.log(np.exp(q).sum(1, keepdims=True))
    return float((np.exp(log_pt) * (log_pt - log_ps)).sum(1).mean())


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_label_loss_is_cross_entropy_on_the_label_column(smoothing):
    logits, target = make_batch()
    loss = LabelLoss(smoothing)(logits, target)
    expected = F.cross_entropy(logits, target[:, 0].long(), label_smoothing=smoothing)
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-6)


def test_label_loss_hand_value_and_ignores_the_soft_column():
    logits = torch.tensor([[0.0, 2.0], [1.0, -1.0]])
    target = torch.tensor([[1.0, 0.3], [1.0, 0.9]])
    # -log softmax(.)[1] per row: log(1 + e^-2) and log(1 + e^2); the mean.
    expected = (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(2))) / 2
    assert LabelLoss()(logits, target).item() == pytest.approx(expected, abs=1e-6)
    other = target.clone()
    other[:, 1] = torch.tensor([0.99, 0.01])
    assert LabelLoss()(logits, other).item() == pytest.approx(expected, abs=1e-6)


def test_label_loss_smoothing_changes_the_loss():
    logits, target = make_batch()
    assert abs(LabelLoss(0.0)(logits, target).item() - LabelLoss(0.2)(logits, target).item()) > 1e-3


@pytest.mark.parametrize("smoothing", [0.0, 0.05])
def test_distill_alpha_1_is_cross_entropy(smoothing):
    logits, target = make_batch()
    loss = DistillLoss(alpha=1.0, temperature=2.0, label_smoothing=smoothing)(logits, target)
    expected = F.cross_entropy(logits, target[:, 0].long(), label_smoothing=smoothing)
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("t", [1.0, 2.0, 4.0])
def test_distill_student_equal_to_teacher_has_zero_kl(t):
    _, target = make_batch()
    student = teacher_logits(target[:, 1])
    loss = DistillLoss(alpha=0.0, temperature=t)(student, target)
    assert abs(loss.item()) < 1e-6
    # Softmax is shift invariant: the same distribution with shifted logits is also a perfect match.
    assert abs(DistillLoss(alpha=0.0, temperature=t)(student + 3.0, target).item()) < 1e-6


def test_distill_kl_is_positive_when_student_differs():
    logits, target = make_batch()
    assert DistillLoss(alpha=0.0, temperature=2.0)(logits, target).item() > 1e-3


@pytest.mark.parametrize("t", [1.0, 2.0, 3.5])
def test_distill_alpha_0_is_t_squared_times_kl(t):
    logits, target = make_batch(seed=1)
    loss = DistillLoss(alpha=0.0, temperature=t)(logits, target)
    expected = t ** 2 * hand_kl(logits, teacher_logits(target[:, 1].double()).float(), t)
    assert loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_distill_mixes_ce_and_kl_with_alpha():
    logits, target = make_batch(seed=2)
    t, alpha, smoothing = 2.0, 0.3, 0.05
    loss = DistillLoss(alpha=alpha, temperature=t, label_smoothing=smoothing)(logits, target)
    ce = F.cross_entropy(logits, target[:, 0].long(), label_smoothing=smoothing).item()
    kl = hand_kl(logits, teacher_logits(target[:, 1].double()).float(), t)
    assert loss.item() == pytest.approx(alpha * ce + (1 - alpha) * t ** 2 * kl, rel=1e-5)


def test_distill_gradients_reach_the_student_only():
    logits, target = make_batch(seed=3)
    logits = logits.clone().requires_grad_(True)
    target = target.clone().requires_grad_(True)
    DistillLoss(alpha=0.5, temperature=2.0, label_smoothing=0.05)(logits, target).backward()
    assert target.grad is None
    assert logits.grad is not None
    assert logits.grad.abs().sum().item() > 1e-4
    assert torch.isfinite(logits.grad).all()


def test_distill_kl_gradient_points_towards_the_teacher():
    # One image, teacher says 0.9 parasitized, student says 0.5: descending the KL raises the student's logit 1.
    logits = torch.zeros(1, 2, requires_grad=True)
    target = torch.tensor([[0.0, 0.9]])
    DistillLoss(alpha=0.0, temperature=2.0)(logits, target).backward()
    assert logits.grad[0, 1] < 0 < logits.grad[0, 0]


def test_distill_saturated_teacher_is_finite():
    logits, _ = make_batch(n=4)
    target = torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.0, 0.0], [1.0, 1.0]])
    logits.requires_grad_(True)
    loss = DistillLoss(alpha=0.5, temperature=2.0)(logits, target)
    loss.backward()
    assert math.isfinite(loss.item())
    assert torch.isfinite(logits.grad).all()
