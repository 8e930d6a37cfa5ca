"""binary_metrics and best_threshold (pipeline.lib.metrics) on hand examples, checked against sklearn and brute force."""
from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, log_loss, roc_auc_score

from pipeline.lib.metrics import best_threshold, binary_metrics

Y = np.array([0, 0, 1, 1, 1, 0])
P = np.array([0.1, 0.6, 0.7, 0.4, 0.9, 0.2])


def test_binary_metrics_hand_example():
    m = binary_metrics(Y, P)
    assert set(m) == {"accuracy", "f1", "roc_auc", "log_loss"}
    # At 0.5: predictions 0 1 1 0 1 0 -> 4 of 6 right; TP 2, FP 1, FN 1.
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    # Positive/negative pairs ranked right: 0.7 > all 3, 0.4 > 0.1 and 0.2, 0.9 > all 3 -> 8 of 9.
    assert m["roc_auc"] == pytest.approx(8 / 9)
    hand_ll = -np.mean(np.log([0.9, 0.4, 0.7, 0.4, 0.9, 0.8]))
    assert m["log_loss"] == pytest.approx(hand_ll)


def test_binary_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 50)
    p = np.clip(rng.random(50) * 0.6 + 0.4 * y - 0.1, 0.01, 0.99)
    for thr in (0.3, 0.5, 0.65):
        m = binary_metrics(y, p, thr)
        pred = (p >= thr).astype(int)
        assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
        assert m["f1"] == pytest.approx(f1_score(y, pred))
        assert m["roc_auc"] == pytest.approx(roc_auc_score(y, p))
        assert m["log_loss"] == pytest.approx(log_loss(y, p))


def test_binary_metrics_threshold_is_inclusive_and_used():
    assert binary_metrics(Y, P, 0.65)["accuracy"] == pytest.approx(5 / 6)  # 0.6 becomes negative
    assert binary_metrics(Y, P, 0.7)["accuracy"] == pytest.approx(5 / 6)  # p >= threshold is positive
    assert binary_metrics(Y, P, 0.71)["accuracy"] == pytest.approx(4 / 6)


def test_binary_metrics_accept_lists_and_floats():
    m = binary_metrics(Y.astype(float).tolist(), P.tolist())
    assert m["accuracy"] == pytest.approx(4 / 6)


def test_binary_metrics_single_class_has_nan_auc_and_finite_rest():
    m = binary_metrics([1, 1, 1], [0.9, 0.8, 0.3])
    assert math.isnan(m["roc_auc"])
    assert m["accuracy"] == pytest.approx(2 / 3)
    assert math.isfinite(m["log_loss"]) and m["log_loss"] > 0


def test_binary_metrics_saturated_probabilities_give_a_finite_log_loss():
    m = binary_metrics([0, 1, 1], [1.0, 0.0, 1.0])
    assert math.isfinite(m["log_loss"])
    assert m["log_loss"] == pytest.approx(-2 * math.log(1e-6) / 3 - math.log(1 - 1e-6) / 3, rel=1e-6)
    assert m["accuracy"] == pytest.approx(1 / 3)


def test_binary_metrics_no_positive_predictions_has_zero_f1():
    m = binary_metrics([0, 1], [0.1, 0.2])
    assert m["f1"] == 0.0
    assert m["roc_auc"] == pytest.approx(1.0)


# --- best_threshold -------------------------------------------------------------------------------------------------

def accuracy(y, p, t) -> float:
    """Accuracy of `p >= t`, as the submissions threshold raw probabilities."""
    return float(((np.asarray(p) >= t).astype(int) == np.asarray(y)).mean())


def best_achievable(y, p) -> float:
    """Brute force: every distinct cut of the sorted scores (below all, between neighbours, above all)."""
    s = np.unique(p)
    candidates = [s[0] - 1, *((s[:-1] + s[1:]) / 2), s[-1] + 1]
    return max(accuracy(y, p, t) for t in candidates)


CASES = {
    "hand": (Y, P),
    "separable": ([0, 0, 0, 1, 1], [0.1, 0.2, 0.3, 0.8, 0.9]),
    "shifted": ([0, 0, 1, 1, 1], [0.05, 0.1, 0.12, 0.15, 0.9]),  # best cut near 0.11, far from 0.5
    "high": ([0, 0, 0, 0, 1], [0.6, 0.7, 0.8, 0.9, 0.95]),  # best cut above 0.9
    "all-positive-best": ([0, 1, 1, 1], [0.5, 0.1, 0.2, 0.3]),  # predicting everything 1 wins
    "all-negative-best": ([1, 0, 0, 0], [0.5, 0.6, 0.7, 0.8]),  # predicting everything 0 wins
    "all-labels-1": ([1, 1, 1], [0.2, 0.4, 0.6]),
    "all-labels-0": ([0, 0, 0], [0.2, 0.4, 0.6]),
    "single": ([1], [0.3]),
    "unsorted-ties-across-classes-apart": ([1, 0, 1, 0], [0.9, 0.1, 0.9, 0.1]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_best_threshold_achieves_the_best_accuracy(name):
    y, p = map(np.asarray, CASES[name])
    t = best_threshold(y, p)
    assert 0.0 <= t <= 1.0
    assert accuracy(y, p, t) == pytest.approx(best_achievable(y, p)), (t, name)
    assert binary_metrics(y, p, t)["accuracy"] == pytest.approx(best_achievable(y, p))


def test_best_threshold_random_cases():
    rng = np.random.default_rng(1)
    for _ in range(30):
        n = int(rng.integers(2, 25))
        y = rng.integers(0, 2, n)
        p = rng.permutation(np.linspace(0.01, 0.99, n))[:n] * 0.5 + 0.5 * rng.random(n) * y  # distinct, noisy
        p = np.clip(p, 0.001, 0.999)
        t = best_threshold(y, p)
        assert accuracy(y, p, t) == pytest.approx(best_achievable(y, p))


def test_best_threshold_is_midway_between_neighbours():
    assert best_threshold([0, 0, 0, 1, 1], [0.1, 0.2, 0.3, 0.8, 0.9]) == pytest.approx(0.55)
    assert best_threshold([0, 0, 1, 1, 1], [0.05, 0.1, 0.12, 0.15, 0.9]) == pytest.approx(0.11)


def test_best_threshold_all_positive_is_at_most_the_lowest_score():
    y, p = [1, 1, 1], [0.2, 0.4, 0.6]
    t = best_threshold(y, p)
    assert t <= 0.2
    assert accuracy(y, p, t) == 1.0


def test_best_threshold_all_negative_is_above_the_highest_score():
    y, p = [0, 0, 0], [0.2, 0.4, 0.6]
    t = best_threshold(y, p)
    assert 0.6 < t <= 1.0
    assert accuracy(y, p, t) == 1.0


def test_best_threshold_with_tied_probabilities():
    # Three images with the same score: any threshold labels all three alike, so the best is all-0 (2 of 3 right).
    y, p = np.array([0, 0, 1]), np.array([0.5, 0.5, 0.5])
    t = best_threshold(y, p)
    assert accuracy(y, p, t) == pytest.approx(2 / 3)


def test_best_threshold_all_negative_with_a_saturated_score():
    y, p = np.array([0, 0, 0]), np.array([0.2, 0.5, 1.0])
    t = best_threshold(y, p)
    assert accuracy(y, p, t) == 1.0  # actual: t = 1.0, the 1.0 image is predicted 1, accuracy 2/3
