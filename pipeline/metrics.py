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
    """The accuracy-maximising threshold on (OOF) probabilities, midway between neighbouring scores."""
    y, p = np.asarray(y, int), np.asarray(p, float)
    order = np.argsort(p)
    ps, ys = p[order], y[order]
    # Accuracy when predicting 1 for everything from position i on: negatives below + positives from i.
    correct = np.concatenate([[0], np.cumsum(ys == 0)]) + np.concatenate([np.cumsum((ys == 1)[::-1])[::-1], [0]])
    i = int(np.argmax(correct))
    if i == 0:
        return float(ps[0] / 2)
    if i == len(ps):
        return float((ps[-1] + 1) / 2)
    return float((ps[i - 1] + ps[i]) / 2)
