"""Binary classification metrics shared by training, the ensemble, distillation and the leaderboard."""
from __future__ import annotations

import numpy as np
from sklearn.metrics import f1_score, log_loss, roc_auc_score


def binary_metrics(y, p, threshold: float = 0.5) -> dict:
    """Accuracy and F1 at `threshold`, ROC AUC and log loss of parasitized probabilities `p`."""
    y, p = np.asarray(y, int), np.clip(np.asarray(p, float), 1e-6, 1 - 1e-6)
    pred = (p >= threshold).astype(int)
    return {"accuracy": float((pred == y).mean()),
            "roc_auc": float(roc_auc_score(y, p)) if len(set(y)) == 2 else float("nan"),
            "log_loss": float(log_loss(y, p, labels=[0, 1])),
            "f1": float(f1_score(y, pred, zero_division=0))}


def best_threshold(y, p) -> float:
    """The accuracy-maximising threshold (predict 1 where p >= t) on (OOF) probabilities.

    Candidates lie between distinct scores (ties move together), below the lowest and above the highest."""
    y, p = np.asarray(y, int), np.asarray(p, float)
    u = np.unique(p)
    low = u[0] / 2 if u[0] > 0 else u[0] - 1e-6
    high = (u[-1] + 1) / 2 if u[-1] < 1 else np.nextafter(u[-1], np.inf)
    cand = np.concatenate([[low], (u[:-1] + u[1:]) / 2, [high]])
    neg, pos = np.sort(p[y == 0]), np.sort(p[y == 1])
    correct = np.searchsorted(neg, cand, "left") + len(pos) - np.searchsorted(pos, cand, "left")
    return float(cand[int(np.argmax(correct))])


def accuracy_se(accuracy: float, n: int) -> float:
    """The binomial standard error of an accuracy measured on n cells."""
    return (accuracy * (1 - accuracy) / n) ** 0.5 if n else float("nan")


def mcnemar(correct_a, correct_b) -> dict:
    """Exact McNemar test of two models on the same cells: the discordant counts (cells only A got right, only B
    got right) and the two-sided binomial p of so lopsided a split if both were equally good."""
    from scipy.stats import binomtest

    a, b = np.asarray(correct_a, bool), np.asarray(correct_b, bool)
    only_a, only_b = int((a & ~b).sum()), int((b & ~a).sum())
    p = binomtest(only_a, only_a + only_b, 0.5).pvalue if only_a + only_b else 1.0
    return {"only_a": only_a, "only_b": only_b, "p": float(p)}
