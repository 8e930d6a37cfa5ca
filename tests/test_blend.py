"""The ensemble's choices on OOF (pipeline.lib.blend): blend weights and the decision threshold, each kept only where it
beats the simple choice on folds it was not fitted on."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from pipeline.lib.blend import blend, choose_blend, choose_threshold
from pipeline.ensemble import ensemble
from pipeline.lib.metrics import best_threshold


def noisy_scores(n: int, seed: int, shift: float = 0.0):
    """Labels, 5 folds and probabilities whose best cut lies at sigmoid(shift) (0.5 when shift is 0), with overlap."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    logit = rng.normal(np.where(y == 1, 1.0, -1.0), 1.0) + shift
    return y, np.arange(n) % 5, 1 / (1 + np.exp(-logit))


def test_a_threshold_tuned_in_sample_is_not_kept_when_other_folds_do_not_confirm_it():
    y, fold, p = noisy_scores(600, seed=3)
    in_sample = best_threshold(y, p)
    assert in_sample != 0.5 and ((p >= in_sample) == y).mean() > ((p >= 0.5) == y).mean()  # it always looks better
    thr, cv_thr, scores = choose_threshold(p, y, fold)
    assert thr == 0.5 and cv_thr == 0.5
    assert scores["tuned"] <= scores["fixed"] == pytest.approx(((p >= 0.5) == y).mean())


def test_a_win_by_one_cell_on_other_folds_is_noise_and_0_5_stays():
    y, fold, p = noisy_scores(600, seed=4, shift=-0.15)
    thr, cv_thr, scores = choose_threshold(p, y, fold)
    assert (scores["only_tuned_right"], scores["only_fixed_right"]) == (14, 13)  # tuned ahead, by one cell
    assert scores["tuned"] > scores["fixed"] and scores["p_value"] == pytest.approx(0.5)
    assert thr == 0.5 and cv_thr == 0.5


def test_a_systematic_shift_keeps_the_tuned_threshold_scored_on_other_folds():
    y, fold, p = noisy_scores(2000, seed=4, shift=-1.2)  # the models under-call parasitized: the best cut is ~0.23
    thr, cv_thr, scores = choose_threshold(p, y, fold)
    assert thr == pytest.approx(best_threshold(y, p)) and 0.1 < thr < 0.4
    assert scores["tuned"] > scores["fixed"] + 0.03 and scores["p_value"] < 1e-6
    for k in range(5):  # each fold's rows are cut where the other four folds chose
        m = fold == k
        assert np.all(cv_thr[m] == best_threshold(y[~m], p[~m]))


def test_fitted_blend_weights_win_only_on_held_out_folds():
    y, fold, good = noisy_scores(1500, seed=5)
    noise = np.random.default_rng(6).uniform(0.01, 0.99, len(y))  # a member that knows nothing
    method, w, scores = choose_blend(np.c_[good, noise], y, fold)
    assert method == "weighted" and scores["weighted"] < scores["mean"] and w[0] > 0.9
    same = choose_blend(np.c_[good, good], y, fold)
    assert same[0] == "mean" and np.allclose(same[1], 0.5)
    assert np.allclose(blend(np.c_[good, good], same[1]), good, atol=1e-6)


def test_the_ensemble_stage_scores_its_cv_at_the_held_out_cuts(tmp_path):
    """One backbone whose probabilities are shifted (best cut ~0.23): the stage keeps the tuned cut for test and
    hidden, but its CV accuracy is the held-out one, below the in-sample accuracy at that same cut."""
    y, fold, p = noisy_scores(2000, seed=4, shift=-1.2)
    names = [f"c{i}.png" for i in range(len(y))]
    folds = pd.DataFrame({"img_name": names, "label": y, "fold": fold})
    folds.to_csv(tmp_path / "folds.csv", index=False)
    test_y, _, test_p = noisy_scores(400, seed=7, shift=-1.2)
    test_names = [f"t{i}.png" for i in range(len(test_y))]
    index = pd.DataFrame({"img_name": names + test_names, "label": np.r_[y, test_y],
                          "split": ["train"] * len(y) + ["test"] * len(test_y)})
    index.to_csv(tmp_path / "index.csv", index=False)
    for k in range(5):
        out = tmp_path / "models" / "b" / f"fold{k}"
        out.mkdir(parents=True)
        m = fold == k
        pd.DataFrame({"img_name": np.array(names)[m], "prob": p[m], "prob_tta": p[m]}).to_csv(out / "oof.csv")
        pd.DataFrame({"img_name": test_names, "prob": test_p, "prob_tta": test_p}).to_csv(out / "test.csv")
        pd.DataFrame(columns=["img_name", "prob", "prob_tta"]).to_csv(out / "hidden.csv")
    report = ensemble(tmp_path / "models", tmp_path / "folds.csv", tmp_path / "index.csv", tmp_path / "out",
                      backbones=["b"], tta={"views": ["identity", "hflip"], "crop_scale": 0.875})
    assert json.loads((tmp_path / "out" / "scores.json").read_text())["tta"] == {  # for predict --model ensemble --tta
        "views": ["identity", "hflip"], "crop_scale": 0.875}
    thr, _, scores = choose_threshold(p, y, fold)
    for name in ("ensemble", "ensemble_tta"):
        assert report["blend"][name]["threshold"] == pytest.approx(thr) and thr < 0.4
        assert report["blend"][name]["threshold_cv_accuracy"] == scores
        cv = report["metrics"][name]["cv"]["accuracy"]
        assert cv == pytest.approx(scores["tuned"]) and cv < ((p >= thr) == y).mean()  # not the in-sample figure
        assert report["metrics"][name]["test"]["accuracy"] == pytest.approx(((test_p >= thr) == test_y).mean())
    assert report["metrics"]["b"]["cv"]["accuracy"] == pytest.approx(scores["fixed"])  # a backbone stays at 0.5
