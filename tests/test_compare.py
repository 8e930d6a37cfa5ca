"""Paired comparison of two runs on the same labelled test cells: exact McNemar on the discordant cells."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.tools import compare
from pipeline.lib.common import PipelineError
from pipeline.lib.metrics import mcnemar


def test_exact_mcnemar_on_known_splits():
    right = np.ones(20, bool)
    assert mcnemar(right, np.r_[np.zeros(10, bool), np.ones(10, bool)]) == {"only_a": 10, "only_b": 0,
                                                                             "p": pytest.approx(2 / 2**10)}
    a, b = np.r_[[1] * 3 + [0] * 4 + [1] * 5], np.r_[[0] * 3 + [1] * 4 + [1] * 5]
    assert mcnemar(a, b) == {"only_a": 3, "only_b": 4, "p": pytest.approx(1.0)}
    assert mcnemar(right, right)["p"] == 1.0  # no discordant cell: nothing tells them apart


def fake_run(root: Path, labels: np.ndarray, student: np.ndarray, ensemble: np.ndarray, threshold: float = 0.5
             ) -> Path:
    """A finished run's files the comparison reads: index, test predictions, leaderboard and a submission."""
    names = [f"cell_{i}.png" for i in range(len(labels))]
    (root / "data/prepared").mkdir(parents=True)
    index = pd.DataFrame({"split": ["test"] * len(names) + ["hidden"] * 2, "img_name": names + ["h0.png", "h1.png"],
                          "label": list(labels) + [None, None]})
    index.to_csv(root / "data/prepared/index.csv", index=False)
    for d, frame in (("student", {"prob": student, "prob_tta": student}),
                     ("ensemble", {"label": labels, "ensemble": ensemble})):
        (root / "data" / d).mkdir(parents=True)
        pd.DataFrame({"img_name": names, **frame}).to_csv(root / "data" / d / "test.csv", index=False)
    (root / "data/ensemble/scores.json").write_text(json.dumps({"metrics": {"ensemble": {"threshold": threshold}}}))
    latest = root / "submissions/latest"
    latest.mkdir(parents=True)
    pd.DataFrame({"file": ["student_tta.csv", "ensemble.csv"], "threshold": [0.5, round(threshold, 4)]}).to_csv(
        latest / "leaderboard.csv", index=False)
    for f in ("student_tta.csv", "ensemble.csv"):
        pd.DataFrame({"img_name": ["h0.png", "h1.png"], "label": [0, 1]}).to_csv(latest / f, index=False)
    return latest


def test_two_runs_submissions_compared_on_their_test_cells(tmp_path):
    y = np.array([1, 0] * 50)
    good = np.where(y == 1, 0.9, 0.1)
    worse = good.copy()
    worse[:12] = 1 - worse[:12]  # 12 cells wrong
    a = fake_run(tmp_path / "a", y, student=good, ensemble=good)
    b = fake_run(tmp_path / "b", y, student=worse, ensemble=worse)
    r = compare.paired(a / "student_tta.csv", b / "student_tta.csv")
    assert r["n"] == 100 and (r["only_a"], r["only_b"]) == (12, 0)
    assert r["a"]["accuracy"] == 1.0 and r["b"]["accuracy"] == pytest.approx(0.88)
    assert r["b"]["accuracy_se"] == pytest.approx((0.88 * 0.12 / 100) ** 0.5)
    assert r["mcnemar_p"] == pytest.approx(2 / 2**12)
    assert "McNemar p = 0.000488" in compare.summary(r)


def test_the_ensembles_own_threshold_is_used_and_a_bench_folder_needs_its_labels(tmp_path):
    y = np.array([1, 0] * 10)
    p = np.where(y == 1, 0.6, 0.3)
    # 0.60004 rounds to the leaderboard's 0.6000, which would call every positive right: the run itself misses them.
    run = fake_run(tmp_path / "run", y, student=p, ensemble=p, threshold=0.60004)
    bench = tmp_path / "plain"
    bench.mkdir()
    # The plain network is scored without TTA: its prob, not its prob_tta.
    pd.DataFrame({"img_name": [f"cell_{i}.png" for i in range(20)], "prob": p, "prob_tta": 1 - p}).to_csv(
        bench / "test.csv", index=False)
    with pytest.raises(PipelineError, match="holds no labels"):
        compare.paired(bench, run / "ensemble.csv")
    r = compare.paired(bench, run / "ensemble.csv", prepared=tmp_path / "run/data/prepared")
    assert r["a"]["accuracy"] == 1.0 and r["b"]["accuracy"] == 0.5 and (r["only_a"], r["only_b"]) == (10, 0)


def test_runs_on_different_cells_or_an_unknown_file_are_refused(tmp_path):
    a = fake_run(tmp_path / "a", np.array([1, 0, 1, 0]), student=np.full(4, 0.6), ensemble=np.full(4, 0.6))
    b = fake_run(tmp_path / "b", np.array([1, 0, 1]), student=np.full(3, 0.6), ensemble=np.full(3, 0.6))
    with pytest.raises(PipelineError, match="different test cells"):
        compare.paired(a / "student_tta.csv", b / "student_tta.csv")
    with pytest.raises(PipelineError, match="is not in .*leaderboard.csv"):
        compare.paired(a / "resnet18.csv", a / "ensemble.csv")
    with pytest.raises(PipelineError, match="neither a submission file"):
        compare.paired(tmp_path, a / "ensemble.csv")
    with pytest.raises(PipelineError, match="not img_name and prob"):
        compare.paired(tmp_path / "a/data/ensemble/test.csv", a / "ensemble.csv", prepared=tmp_path / "a/data/prepared")


def test_the_command_prints_and_writes_json(tmp_path, monkeypatch, capsys):
    y = np.array([1, 0] * 5)
    a = fake_run(tmp_path / "a", y, student=np.where(y == 1, 0.9, 0.1), ensemble=np.full(10, 0.9))
    monkeypatch.setattr(sys, "argv", ["compare", str(a / "student_tta.csv"), str(a / "ensemble.csv"),
                                      "--json", str(tmp_path / "r.json")])
    compare.main()
    assert "5 right only in a, 0 only in b" in capsys.readouterr().out
    assert json.loads((tmp_path / "r.json").read_text())["only_a"] == 5
