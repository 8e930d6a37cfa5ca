"""data.train_on_test (the final fit): the labelled test images also train, and every test score is marked seen."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from helpers import pipeline_log
from pipeline.lib.common import PipelineError, labelled_test_seen
from pipeline.distill import unlabelled_rows
from pipeline.ensemble import ensemble
from pipeline.export import int8_verdict
from pipeline.folds import make_folds
from pipeline.prepare import prepare


class Final:
    """The real sample prepared with train_on_test, and prepare's log."""

    def __init__(self, out: Path, df: pd.DataFrame, log: list[logging.LogRecord]):
        self.out, self.df, self.log = out, df, log
        self.index = pd.read_csv(out / "index.csv", dtype={"img_name": str})
        self.images = np.load(out / "images.npy")


@pytest.fixture(scope="module")
def final(nndl_prepared, tmp_path_factory) -> Final:
    out = tmp_path_factory.mktemp("final") / "prepared"
    with pipeline_log() as records:
        df = prepare(nndl_prepared.raw, out, img_size=nndl_prepared.img_size, holdout_fraction=0.15, seed=42,
                     train_on_test=True)
    return Final(out, df, records)


def test_every_test_image_is_also_a_train_row(final, nndl_prepared):
    idx, before = final.index, nndl_prepared.index
    assert idx["split"].value_counts().to_dict() == {"train": 3600, "test": 600, "hidden": 600}
    assert final.images.shape[0] == len(idx) == 4800  # the cache holds each test image twice
    test, train = idx[idx["split"] == "test"], idx[idx["split"] == "train"].set_index("img_name")
    assert train.index.is_unique and set(test["img_name"]) <= set(train.index)
    assert set(train.index) == set(before.loc[before["split"] == "train", "img_name"]) | set(test["img_name"])
    copies = train.loc[test["img_name"]]
    for col in ("label", "group", "path", "hash"):
        assert (copies[col].to_numpy() == test[col].to_numpy()).all(), col
    row = pd.Series(np.arange(len(idx)), index=idx["split"] + "/" + idx["img_name"])
    for name in test["img_name"].iloc[::97]:
        assert np.array_equal(final.images[row[f"train/{name}"]], final.images[row[f"test/{name}"]])
    # The test rows stay, so every stage still scores them; the data itself says they were seen.
    assert labelled_test_seen(idx) and not labelled_test_seen(before)


def test_prepare_says_the_test_set_joined_on_purpose_not_leakage(final):
    warnings = [r.getMessage() for r in final.log if r.levelno >= logging.WARNING]
    assert not [w for w in warnings if "Leakage" in w or "share their content" in w], warnings
    assert any("600 labelled test images join training on purpose" in r.getMessage() for r in final.log)


def test_folds_cover_the_test_images_grouped_by_slide(final):
    folds = make_folds(final.index, n=3, group_by="patient", seed=0)
    test = set(final.index.loc[final.index["split"] == "test", "img_name"])
    assert len(folds) == 3600 and test <= set(folds["img_name"])
    assert folds.groupby("group")["fold"].nunique().max() == 1


def test_ensemble_scores_say_the_test_set_was_seen(final, tmp_path):
    """The ensemble derives test_seen from index.csv (fold predictions here are made up)."""
    folds = make_folds(final.index, n=2, group_by="patient", seed=0)
    folds.to_csv(tmp_path / "folds.csv", index=False)
    rng = np.random.default_rng(0)
    for k in (0, 1):
        d = tmp_path / "models" / "resnet10t" / f"fold{k}"
        d.mkdir(parents=True)
        for split, names in (("oof", folds.loc[folds["fold"] == k, "img_name"]),
                             ("test", final.index.loc[final.index["split"] == "test", "img_name"]),
                             ("hidden", final.index.loc[final.index["split"] == "hidden", "img_name"])):
            p = rng.uniform(0, 1, len(names))
            pd.DataFrame({"img_name": names, "prob": p, "prob_tta": p}).to_csv(d / f"{split}.csv", index=False)
    scores = ensemble(tmp_path / "models", tmp_path / "folds.csv", final.out / "index.csv", tmp_path / "ens",
                      backbones=["resnet10t"])
    assert scores["test_seen"] is True


def test_the_student_does_not_relearn_seen_test_images_unlabelled(tmp_path):
    index = pd.DataFrame({"split": ["train"] * 4 + ["test"] * 2 + ["hidden"] * 2,
                          "img_name": ["a", "b", "t1", "t2", "t1", "t2", "h1", "h2"]})
    for split, names in (("test", ["t1", "t2"]), ("hidden", ["h1", "h2"])):
        pd.DataFrame({"img_name": names, "ensemble_tta": [0.3, 0.8]}).to_csv(tmp_path / f"{split}.csv", index=False)
    rows, _, transductive = unlabelled_rows(index, tmp_path, "hidden_and_test", "ensemble_tta")
    assert index["img_name"].to_numpy()[rows].tolist() == ["h1", "h2"] and not transductive  # t1, t2 had labels


def test_the_int8_gate_does_not_use_a_seen_test_set():
    v = int8_verdict(0.960, 0.900, 600, seen=True)  # 6 pp lower would be refused on a held-out set
    assert (v["kept"], v["gated"]) == (True, False)
    assert "the labelled test images were in training (data.train_on_test)" in v["reason"]
    assert not int8_verdict(0.960, 0.900, 600)["kept"]


def test_a_test_name_that_is_also_a_train_name_is_refused(make_competition, tmp_path):
    raw = make_competition()
    train = pd.read_csv(raw / "train_labels.csv", dtype=str)
    test = pd.read_csv(raw / "test_labels.csv", dtype=str)
    old, new = test["img_name"].iat[0], train["img_name"].iat[0]
    shutil.move(raw / "test" / old, raw / "test" / new)
    test.loc[0, "img_name"] = new
    test.to_csv(raw / "test_labels.csv", index=False)
    prepare(raw, tmp_path / "ok", img_size=16, holdout_fraction=0.15, seed=0)  # without the switch: fine
    with pytest.raises(PipelineError, match=f"data.train_on_test: 1 test images share their name.*{new}"):
        prepare(raw, tmp_path / "p", img_size=16, holdout_fraction=0.15, seed=0, train_on_test=True)


def test_real_leakage_still_warns_under_the_final_fit(make_competition, tmp_path, caplog):
    raw = make_competition()
    train = pd.read_csv(raw / "train_labels.csv", dtype=str)["img_name"].tolist()
    test = pd.read_csv(raw / "test_labels.csv", dtype=str)["img_name"].tolist()
    shutil.copyfile(raw / "train" / train[0], raw / "test" / test[1])
    with caplog.at_level(logging.WARNING):
        prepare(raw, tmp_path / "p", img_size=16, holdout_fraction=0.15, seed=0, train_on_test=True)
    assert "Leakage: 1 test images are identical to train images" in caplog.text and test[1] in caplog.text
