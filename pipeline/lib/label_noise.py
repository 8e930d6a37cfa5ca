"""Training cells whose label the out-of-fold ensemble confidently contradicts: cleanlab's confident learning."""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)


def label_issues(names: pd.Series, labels: np.ndarray, probs: np.ndarray) -> pd.DataFrame:
    """Every training cell with its label, OOF p(parasitized), cleanlab's label quality (the probability the model
    gives the cell's own label) and whether confident learning flags the label as an error, worst first.

    Confident learning counts a cell as mislabelled when the OOF probability of the other class is at least that
    class's mean probability on its own cells (a per-class threshold, so a model that is never very sure still flags
    its clearest contradictions), then keeps the number of flags the estimated noise rate implies ("prune by noise
    rate"). It needs OOF probabilities: a model's own training cells would agree with their labels."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    y = np.asarray(labels, dtype=int)
    pred = np.clip(np.stack([1 - np.asarray(probs, float), np.asarray(probs, float)], axis=1), 1e-6, 1 - 1e-6)
    pred /= pred.sum(axis=1, keepdims=True)
    if len(np.unique(y)) < 2:  # one class only (a tiny synthetic run): nothing to contradict
        flagged = np.zeros(len(y), bool)
    else:
        flagged = find_label_issues(y, pred, filter_by="prune_by_noise_rate", n_jobs=1)
    table = pd.DataFrame({"img_name": np.asarray(names), "label": y, "prob": pred[:, 1],
                          "label_quality": get_label_quality_scores(y, pred), "flagged": flagged})
    return table.sort_values(["flagged", "label_quality"], ascending=[False, True], kind="stable")


def kept_rows(rows: np.ndarray, issues: pd.DataFrame, names: pd.Series, mode: str) -> np.ndarray:
    """The training rows the student learns from: all of them (`keep`), or those whose label is not flagged (`drop`)."""
    if mode == "keep":
        return rows
    flagged = set(issues.loc[issues["flagged"], "img_name"])
    keep = ~np.asarray(names.isin(flagged))
    log.info("distill.label_noise drop: %d of %d training cells flagged as mislabelled are left out", (~keep).sum(),
             len(rows))
    return rows[keep]
