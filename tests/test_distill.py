"""Semi-supervised distillation: which unlabelled images the student learns from, and that no label is read."""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest

from pipeline.lib.common import PipelineError
from pipeline.distill import teacher_files, unlabelled_rows


def layout(tmp_path, public: bool):
    """An index without any label column (so reading a label fails) and the ensemble's test/hidden tables."""
    test = ["t1", "t2"]
    hidden = test if public else ["h1", "h2", "h3"]  # the public layout predicts its test holdout as 'hidden'
    index = pd.DataFrame({"split": ["train"] * 2 + ["test"] * 2 + ["hidden"] * len(hidden),
                          "img_name": ["a", "b", *test, *hidden]})
    pd.DataFrame({"img_name": test, "ensemble_tta": [0.9, 0.2]}).to_csv(tmp_path / "test.csv", index=False)
    pd.DataFrame({"img_name": hidden, "ensemble_tta": np.linspace(0.1, 0.7, len(hidden))}).to_csv(
        tmp_path / "hidden.csv", index=False)
    return index


def test_competition_layout(tmp_path):
    index = layout(tmp_path, public=False)
    rows, soft, transductive = unlabelled_rows(index, tmp_path, "none", "ensemble_tta")
    assert len(rows) == 0 and not transductive
    rows, soft, transductive = unlabelled_rows(index, tmp_path, "hidden", "ensemble_tta")
    assert index["img_name"].to_numpy()[rows].tolist() == ["h1", "h2", "h3"] and not transductive
    np.testing.assert_allclose(soft, [0.1, 0.4, 0.7])  # the ensemble's probabilities, not labels
    rows, soft, transductive = unlabelled_rows(index, tmp_path, "hidden_and_test", "ensemble_tta")
    assert index["img_name"].to_numpy()[rows].tolist() == ["h1", "h2", "h3", "t1", "t2"] and transductive
    np.testing.assert_allclose(soft[3:], [0.9, 0.2])


def test_public_layout_never_feeds_its_test_holdout_as_hidden(tmp_path, caplog):
    index = layout(tmp_path, public=True)
    with caplog.at_level(logging.WARNING):
        rows, _, transductive = unlabelled_rows(index, tmp_path, "hidden", "ensemble_tta")
    assert len(rows) == 0 and not transductive and "stays honest" in caplog.text
    rows, soft, transductive = unlabelled_rows(index, tmp_path, "hidden_and_test", "ensemble_tta")
    assert sorted(index["img_name"].to_numpy()[rows]) == ["t1", "t2"] and transductive  # each image once


def test_no_label_is_read(tmp_path):
    index = layout(tmp_path, public=False)
    assert "label" not in index  # reading a label would raise KeyError
    for mode in ("none", "hidden", "hidden_and_test"):
        unlabelled_rows(index, tmp_path, mode, "ensemble_tta")


def test_the_students_teachers_are_the_checkpoints_its_targets_come_from(tmp_path):
    for d in ("a/fold0", "a/fold1", "a/full", "b/fold0"):
        (tmp_path / d).mkdir(parents=True)
        (tmp_path / d / "checkpoint.pt").write_bytes(b"")
    names = lambda files: [f.parent.relative_to(tmp_path).as_posix() for f in files]
    # The training images' targets are the folds' OOF; the refit model counts only when hidden images are fed.
    assert names(teacher_files(tmp_path, ["a", "b"], {"a"}, "none")) == ["a/fold0", "a/fold1", "b/fold0"]
    assert names(teacher_files(tmp_path, ["a", "b"], {"a"}, "hidden")) == ["a/fold0", "a/fold1", "a/full", "b/fold0"]
    with pytest.raises(PipelineError, match="c has no fold checkpoint"):
        teacher_files(tmp_path, ["c"], set(), "none")
