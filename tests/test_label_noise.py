"""distill.label_noise: confident learning flags the labels the OOF probabilities contradict, and drop leaves them out."""
from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline.lib.label_noise import kept_rows, label_issues


def noisy_cells(n: int = 400, flipped: int = 12, seed: int = 0):
    """Cells with a confident, mostly right OOF model; `flipped` of them carry the wrong label."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 2, n)
    probs = np.where(truth == 1, rng.uniform(0.75, 0.99, n), rng.uniform(0.01, 0.25, n))
    labels = truth.copy()
    wrong = rng.choice(n, flipped, replace=False)
    labels[wrong] = 1 - labels[wrong]
    names = pd.Series([f"c{i:04d}.png" for i in range(n)])
    return names, labels, probs, set(names[wrong])


def test_flipped_labels_are_flagged_and_right_ones_are_not():
    names, labels, probs, wrong = noisy_cells()
    issues = label_issues(names, labels, probs)
    flagged = set(issues.loc[issues["flagged"], "img_name"])
    # No right label is flagged; a flipped one is missed only where the model is less sure than that class's mean.
    assert flagged <= wrong and len(flagged) >= 0.8 * len(wrong)
    assert issues["flagged"].iloc[: len(flagged)].all()  # flagged first, worst first
    assert issues["label_quality"].iloc[: len(flagged)].is_monotonic_increasing
    assert set(issues.columns) == {"img_name", "label", "prob", "label_quality", "flagged"}


def test_drop_leaves_out_exactly_the_flagged_rows_and_keep_leaves_all():
    names, labels, probs, wrong = noisy_cells()
    rows = np.arange(100, 100 + len(names))  # cache rows need not start at 0
    issues = label_issues(names, labels, probs)
    assert (kept_rows(rows, issues, names, "keep") == rows).all()
    kept = kept_rows(rows, issues, names, "drop")
    flagged = set(issues.loc[issues["flagged"], "img_name"])
    assert len(kept) == len(rows) - len(flagged) and flagged
    assert not set(names[kept - 100]) & flagged


def test_one_class_flags_nothing():
    names = pd.Series(["a", "b", "c"])
    issues = label_issues(names, np.zeros(3, int), np.array([0.1, 0.9, 0.2]))
    assert not issues["flagged"].any()
