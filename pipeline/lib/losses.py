"""Losses over 2-class logits; targets are (N, 2) rows of [hard label, teacher's parasitized probability]."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LabelLoss(nn.Module):
    """Cross-entropy against the label (hard, or soft after mixup/CutMix), with label smoothing (teachers)."""

    def __init__(self, label_smoothing: float = 0.0):
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # Class probabilities, not indices: mixup/CutMix make the label soft; for a hard label it is the same loss.
        y = target[:, 0].detach()
        return F.cross_entropy(logits, torch.stack([1 - y, y], 1), label_smoothing=self.label_smoothing)


class DistillLoss(nn.Module):
    """alpha * CE(label) + (1 - alpha) * T^2 * KL(teacher_T || student_T) (Hinton et al., 2015)."""

    def __init__(self, alpha: float, temperature: float, label_smoothing: float = 0.0):
        super().__init__()
        self.alpha, self.t, self.ce = alpha, temperature, LabelLoss(label_smoothing)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        p = target[:, 1].clamp(1e-6, 1 - 1e-6)
        # The teacher's probability as 2-class logits [0, logit(p)], softened by the same temperature.
        teacher_logits = torch.stack([torch.zeros_like(p), torch.logit(p)], 1).detach()
        kl = F.kl_div(F.log_softmax(logits / self.t, 1), F.log_softmax(teacher_logits / self.t, 1),
                      log_target=True, reduction="batchmean")
        return self.alpha * self.ce(logits, target) + (1 - self.alpha) * self.t ** 2 * kl
