"""Blending backbones' probabilities in logit space, with weights fitted on out-of-fold predictions."""
from __future__ import annotations

import numpy as np
from scipy.optimize import minimize
from scipy.special import softmax
from scipy.stats import binomtest

from pipeline.lib.metrics import best_threshold, binary_metrics


def fit_weights(P: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Non-negative weights summing to 1 (a softmax of free parameters) minimising the blend's log loss."""
    logit = np.log(np.clip(P, 1e-6, 1 - 1e-6) / np.clip(1 - P, 1e-6, 1))

    def loss(z):
        p = 1 / (1 + np.exp(-(logit @ softmax(z))))
        return -np.mean(y * np.log(p + 1e-9) + (1 - y) * np.log(1 - p + 1e-9))

    return softmax(minimize(loss, np.zeros(P.shape[1]), method="Nelder-Mead").x)


def blend(P: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted mean in logit space (a geometric blend; equal weights give the logit mean)."""
    logit = np.log(np.clip(P, 1e-6, 1 - 1e-6) / np.clip(1 - P, 1e-6, 1))
    return 1 / (1 + np.exp(-(logit @ w)))


def choose_blend(P: np.ndarray, y: np.ndarray, fold: np.ndarray) -> tuple[str, np.ndarray, dict]:
    """Equal weights vs fitted weights, compared honestly: fitted weights are scored on folds they did not see."""
    equal = np.full(P.shape[1], 1 / P.shape[1])
    nested = np.zeros(len(y))
    for k in np.unique(fold):
        nested[fold == k] = blend(P[fold == k], fit_weights(P[fold != k], y[fold != k]))
    scores = {"mean": binary_metrics(y, blend(P, equal))["log_loss"], "weighted": binary_metrics(y, nested)["log_loss"]}
    method = min(scores, key=scores.get)
    return method, equal if method == "mean" else fit_weights(P, y), scores


def choose_threshold(p: np.ndarray, y: np.ndarray, fold: np.ndarray) -> tuple[float, np.ndarray | float, dict]:
    """0.5 vs the OOF accuracy-maximising threshold, compared honestly: each fold is scored at the threshold the
    other folds chose (the best threshold on the very cells it is scored on always looks better than 0.5).

    The tuned one is kept only if it is right on significantly more cells than 0.5 (exact one-sided McNemar test,
    5 %): a win by a cell or two is noise, and cost test accuracy when it was kept. Returns the threshold for test
    and hidden, the threshold(s) the OOF accuracy is scored at (per row when tuned), and the comparison."""
    p, y, fold = np.asarray(p, float), np.asarray(y, int), np.asarray(fold)
    nested = np.empty(len(y))
    for k in np.unique(fold):
        nested[fold == k] = best_threshold(y[fold != k], p[fold != k])
    right_fixed, right_tuned = (p >= 0.5) == y, (p >= nested) == y
    only_tuned, only_fixed = int((right_tuned & ~right_fixed).sum()), int((right_fixed & ~right_tuned).sum())
    p_value = binomtest(only_tuned, only_tuned + only_fixed, alternative="greater").pvalue if only_tuned else 1.0
    scores = {"fixed": float(right_fixed.mean()), "tuned": float(right_tuned.mean()), "only_fixed_right": only_fixed,
              "only_tuned_right": only_tuned, "p_value": float(p_value)}
    if p_value < 0.05:
        return best_threshold(y, p), nested, scores
    return 0.5, 0.5, scores
