"""Submission validation, the submission files and leaderboard, and sending (dry run / no credentials)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline import submit as submit_mod
from pipeline.lib.common import PipelineError
from pipeline.submit import make_submissions, send, validate_submission

REPO = Path(__file__).resolve().parent.parent
BACKBONES = ["resnet10t", "densenet121"]
N = 8
IDS = [f"C{i}P1ThinF_IMG_2015_cell_{i}.png" for i in range(N)]
ENSEMBLE_THRESHOLD, ENSEMBLE_TTA_THRESHOLD = 0.3, 0.62

# Distinct test accuracies, so the leaderboard order is unambiguous (student has no CV).
TEST_ACC = {"resnet10t": 0.91, "resnet10t_tta": 0.93, "densenet121": 0.88, "densenet121_tta": 0.90,
            "ensemble": 0.95, "ensemble_tta": 0.96, "student": 0.92, "student_tta": 0.94}


def sample_frame(ids=IDS) -> pd.DataFrame:
    return pd.DataFrame({"img_name": list(ids), "label": 0})


def valid_sub() -> pd.DataFrame:
    return pd.DataFrame({"img_name": IDS, "label": [0, 1] * (N // 2)})


# --- validate_submission ------------------------------------------------------------------------------------------

def test_valid_submission_passes():
    validate_submission(valid_sub(), sample_frame(), "ok")
    validate_submission(valid_sub().assign(label=1.0), sample_frame(), "floats 1.0 are ints")  # read back as float


def _bad(sub: pd.DataFrame, *fragments: str) -> str:
    with pytest.raises(PipelineError) as e:
        validate_submission(sub, sample_frame(), "mysub.csv")
    msg = str(e.value)
    assert "mysub.csv" in msg
    for f in fragments:
        assert f in msg, msg
    return msg


def test_missing_row_is_rejected():
    _bad(valid_sub().iloc[:-1], f"{N - 1} rows", f"expected {N}")


def test_extra_row_is_rejected():
    sub = pd.concat([valid_sub(), pd.DataFrame({"img_name": ["extra.png"], "label": [0]})], ignore_index=True)
    _bad(sub, f"{N + 1} rows", f"expected {N}")


def test_wrong_id_is_rejected_naming_row_and_id():
    sub = valid_sub()
    sub.loc[3, "img_name"] = "not_a_cell.png"
    _bad(sub, "rows 5", "'not_a_cell.png'")  # CSV line 5: header + rows 0..3


def test_shuffled_rows_are_rejected():
    sub = valid_sub().iloc[[1, 0, *range(2, N)]].reset_index(drop=True)
    _bad(sub, "rows 2, 3")


def test_nan_label_is_rejected():
    sub = valid_sub()
    sub["label"] = sub["label"].astype(float)
    sub.loc[2, "label"] = np.nan
    _bad(sub, "1 missing or non-numeric labels")


def test_non_numeric_label_is_rejected():
    sub = valid_sub().astype({"label": object})
    sub.loc[0, "label"] = "yes"
    _bad(sub, "missing or non-numeric")


def test_label_2_is_rejected():
    sub = valid_sub()
    sub.loc[1, "label"] = 2
    _bad(sub, "labels outside {0, 1}", "2")


def test_float_label_is_rejected():
    sub = valid_sub().astype({"label": float})
    sub.loc[4, "label"] = 0.5
    _bad(sub, "labels outside {0, 1}", "0.5")


@pytest.mark.parametrize("columns", [["id", "label"], ["img_name", "pred"], ["label", "img_name"]])
def test_wrong_columns_are_rejected(columns):
    sub = valid_sub()
    sub.columns = columns
    _bad(sub, f"columns are {columns}", "expected ['img_name', 'label']")


def test_extra_column_is_rejected():
    _bad(valid_sub().assign(prob=0.3), "columns are ['img_name', 'label', 'prob']")


# --- make_submissions ---------------------------------------------------------------------------------------------

def _metrics(acc: float) -> dict:
    return {"accuracy": acc, "roc_auc": acc + 0.02, "log_loss": 1 - acc, "f1": acc - 0.01}


@pytest.fixture
def inputs(tmp_path: Path) -> dict:
    """Hand-made outputs of the ensemble and distill stages, and a shuffled sample submission."""
    rng = np.random.default_rng(0)
    ens, stu = tmp_path / "data" / "ensemble", tmp_path / "data" / "student"
    ens.mkdir(parents=True)
    stu.mkdir(parents=True)
    hidden = pd.DataFrame({"img_name": IDS})
    # Probabilities chosen around both 0.5 and the ensemble thresholds, so a wrong threshold shows.
    grid = np.array([0.05, 0.25, 0.35, 0.45, 0.55, 0.6, 0.65, 0.95])
    for col in [*BACKBONES, *[b + "_tta" for b in BACKBONES], "ensemble", "ensemble_tta"]:
        hidden[col] = rng.permutation(grid)
    hidden.to_csv(ens / "hidden.csv", index=False, float_format="%.6f")
    metrics = {}
    for name in [*BACKBONES, "ensemble"]:
        for suffix in ("", "_tta"):
            thr = {"ensemble": ENSEMBLE_THRESHOLD, "ensemble_tta": ENSEMBLE_TTA_THRESHOLD}.get(name + suffix, 0.5)
            metrics[name + suffix] = {"cv": _metrics(TEST_ACC[name + suffix] - 0.01),
                                      "test": _metrics(TEST_ACC[name + suffix]), "threshold": thr}
    blend = {"ensemble": {"method": "mean", "weights": dict.fromkeys(BACKBONES, 0.5), "threshold": ENSEMBLE_THRESHOLD},
             "ensemble_tta": {"method": "mean", "weights": dict.fromkeys(BACKBONES, 0.5),
                              "threshold": ENSEMBLE_TTA_THRESHOLD}}
    (ens / "scores.json").write_text(json.dumps({"blend": blend, "metrics": metrics}))
    # The student's file in yet another order: rows must be matched by name.
    student = pd.DataFrame({"img_name": IDS, "prob": rng.permutation(grid), "prob_tta": rng.permutation(grid)})
    student.iloc[::-1].to_csv(stu / "hidden.csv", index=False, float_format="%.6f")
    (stu / "scores.json").write_text(json.dumps({
        "student": {"test": _metrics(TEST_ACC["student"]), "ms_per_image": 0.5},
        "student_tta": {"test": _metrics(TEST_ACC["student_tta"]), "ms_per_image": 4.0},
        "ensemble": {"test": _metrics(TEST_ACC["ensemble"]), "n_models": 10, "ms_per_image": 5.0},
        "ensemble_tta": {"test": _metrics(TEST_ACC["ensemble_tta"]), "n_models": 10, "ms_per_image": 40.0}}))
    order = [5, 2, 7, 0, 3, 6, 1, 4]
    sample = tmp_path / "sample_submission.csv"
    sample_frame([IDS[i] for i in order]).to_csv(sample, index=False)
    prob = hidden.set_index("img_name")
    prob["student"] = student.set_index("img_name")["prob"]
    prob["student_tta"] = student.set_index("img_name")["prob_tta"]
    return {"ens": ens, "stu": stu, "sample": sample, "out": tmp_path / "submissions", "prob": prob,
            "order": [IDS[i] for i in order]}


def test_make_submissions_writes_every_model_in_sample_order(inputs):
    board = make_submissions(inputs["ens"], inputs["stu"], inputs["sample"], inputs["out"], backbones=BACKBONES)
    names = [m + s for m in [*BACKBONES, "ensemble", "student"] for s in ("", "_tta")]
    assert sorted(p.name for p in inputs["out"].glob("*.csv")) == sorted([f"{n}.csv" for n in names]
                                                                         + ["leaderboard.csv"])
    sample = pd.read_csv(inputs["sample"])
    assert sample["img_name"].tolist() == inputs["order"] != IDS  # the sample really is shuffled
    for name in names:
        sub = pd.read_csv(inputs["out"] / f"{name}.csv")
        assert list(sub.columns) == ["img_name", "label"]
        assert sub["img_name"].tolist() == inputs["order"], name
        assert sub["label"].dtype.kind == "i", name
        assert set(sub["label"]) <= {0, 1}
        thr = {"ensemble": ENSEMBLE_THRESHOLD, "ensemble_tta": ENSEMBLE_TTA_THRESHOLD}.get(name, 0.5)
        expected = (inputs["prob"].loc[inputs["order"], name].to_numpy() >= thr).astype(int)
        np.testing.assert_array_equal(sub["label"].to_numpy(), expected, err_msg=name)
        validate_submission(sub, sample, name)
    assert len(board) == len(names)


@pytest.mark.parametrize("name,thr", [("ensemble", ENSEMBLE_THRESHOLD), ("ensemble_tta", ENSEMBLE_TTA_THRESHOLD)])
def test_ensemble_uses_its_threshold_not_one_half(inputs, name, thr):
    make_submissions(inputs["ens"], inputs["stu"], inputs["sample"], inputs["out"], backbones=BACKBONES)
    sub = pd.read_csv(inputs["out"] / f"{name}.csv").set_index("img_name")["label"]
    p = inputs["prob"][name]
    between = p[(p >= min(thr, 0.5)) & (p < max(thr, 0.5))].index
    assert len(between) > 0  # rows where the two thresholds disagree
    assert (sub.loc[between] == int(thr < 0.5)).all()


def test_leaderboard_has_one_row_per_file_best_test_accuracy_first(inputs):
    board = make_submissions(inputs["ens"], inputs["stu"], inputs["sample"], inputs["out"], backbones=BACKBONES)
    saved = pd.read_csv(inputs["out"] / "leaderboard.csv")
    expected = [f"{n}.csv" for n in sorted(TEST_ACC, key=TEST_ACC.get, reverse=True)]
    assert saved["file"].tolist() == expected
    assert board["file"].tolist() == expected
    np.testing.assert_allclose(saved["test_accuracy"], sorted(TEST_ACC.values(), reverse=True))
    row = saved.set_index("file")
    assert row.loc["ensemble.csv", "threshold"] == pytest.approx(ENSEMBLE_THRESHOLD)
    assert row.loc["resnet10t_tta.csv", "cv_accuracy"] == pytest.approx(TEST_ACC["resnet10t_tta"] - 0.01)
    assert row.loc["resnet10t_tta.csv", "test_roc_auc"] == pytest.approx(TEST_ACC["resnet10t_tta"] + 0.02)
    assert row.loc["student.csv", "threshold"] == pytest.approx(0.5)
    assert np.isnan(row.loc["student.csv", "cv_accuracy"])  # the student has no CV score
    assert bool(row.loc["student_tta.csv", "tta"]) and not bool(row.loc["student.csv", "tta"])
    assert row.loc["student.csv", "model"] == "student"
    for f in row.index:
        labels = pd.read_csv(inputs["out"] / f)["label"]
        assert row.loc[f, "hidden_positive_rate"] == pytest.approx(labels.mean(), abs=1e-4)


def test_make_submissions_fails_on_an_image_without_prediction(inputs):
    sample = pd.read_csv(inputs["sample"])
    pd.concat([sample, pd.DataFrame({"img_name": ["unknown.png"], "label": [0]})]).to_csv(inputs["sample"],
                                                                                         index=False)
    with pytest.raises(PipelineError, match="1 images .* have no resnet10t prediction"):
        make_submissions(inputs["ens"], inputs["stu"], inputs["sample"], inputs["out"], backbones=BACKBONES)


# --- send ---------------------------------------------------------------------------------------------------------

@pytest.fixture
def made(inputs, monkeypatch) -> dict:
    make_submissions(inputs["ens"], inputs["stu"], inputs["sample"], inputs["out"], backbones=BACKBONES)
    monkeypatch.setattr(submit_mod, "git_commit", lambda: "abc1234")
    return inputs


def test_send_dry_run_returns_the_kaggle_command(made):
    file = made["out"] / "ensemble_tta.csv"
    cmd = send(file, competition="some-comp", message="", leaderboard=made["out"] / "leaderboard.csv",
               sample_csv=made["sample"], dry_run=True)
    assert cmd[:7] == ["kaggle", "competitions", "submit", "-c", "some-comp", "-f", str(file)]
    assert cmd[7] == "-m" and len(cmd) == 9
    msg = cmd[8]
    assert "git abc1234" in msg
    assert "ensemble_tta" in msg
    assert f"CV acc {TEST_ACC['ensemble_tta'] - 0.01:.4f}" in msg
    assert f"local test acc {TEST_ACC['ensemble_tta']:.4f}" in msg


def test_send_dry_run_keeps_the_user_message(made):
    cmd = send(made["out"] / "resnet10t.csv", competition="c", message="first try",
               leaderboard=made["out"] / "leaderboard.csv", sample_csv=made["sample"], dry_run=True)
    assert cmd[-1].startswith("first try | resnet10t | git abc1234")
    assert f"local test acc {TEST_ACC['resnet10t']:.4f}" in cmd[-1]


def test_send_rejects_an_invalid_file(made, tmp_path):
    bad = tmp_path / "bad.csv"
    sub = pd.read_csv(made["out"] / "ensemble.csv")
    sub.loc[0, "label"] = 2
    sub.to_csv(bad, index=False)
    with pytest.raises(PipelineError, match="not a valid submission"):
        send(bad, competition="c", message="", leaderboard=made["out"] / "leaderboard.csv",
             sample_csv=made["sample"], dry_run=True)


def test_send_rejects_a_missing_file(made):
    with pytest.raises(PipelineError, match="nope.csv does not exist"):
        send(made["out"] / "nope.csv", competition="c", message="", leaderboard=made["out"] / "leaderboard.csv",
             sample_csv=made["sample"], dry_run=True)


def test_send_without_credentials_says_where_they_go(made, tmp_path, monkeypatch):
    home, config = tmp_path / "home", tmp_path / "kaggle_config"
    home.mkdir()
    config.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(config))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    for var in ("KAGGLE_API_TOKEN", "KAGGLE_USERNAME", "KAGGLE_KEY"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(PipelineError, match="KAGGLE_API_TOKEN"):
        send(made["out"] / "ensemble.csv", competition="c", message="", leaderboard=made["out"] / "leaderboard.csv",
             sample_csv=made["sample"], dry_run=False)


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "pipeline.submit", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=60)


def test_cli_dry_run(made, tmp_path):
    work = tmp_path / "cli"
    work.mkdir()
    shutil.copy(REPO / "params.yaml", work / "params.yaml")
    slug = submit_mod.load_params(work / "params.yaml")["data"]["competition"]
    file = made["out"] / "ensemble.csv"
    r = _cli([str(file), "--dry-run", "--sample", str(made["sample"]), "--out", str(made["out"])], work)
    assert r.returncode == 0, r.stderr
    assert f"kaggle competitions submit -c {slug} -f {file} -m" in r.stderr
    assert "Dry run, not sent" in r.stderr
    assert "| git " in r.stderr  # the commit marker (outside a repository: `git unknown`)
    assert f"local test acc {TEST_ACC['ensemble']:.4f}" in r.stderr
    assert r.stdout == ""


def test_cli_invalid_file_exits_1_with_one_clear_line(made, tmp_path):
    work = tmp_path / "cli"
    work.mkdir()
    shutil.copy(REPO / "params.yaml", work / "params.yaml")
    bad = tmp_path / "bad.csv"
    pd.read_csv(made["out"] / "ensemble.csv").iloc[:-1].to_csv(bad, index=False)
    r = _cli([str(bad), "--dry-run", "--sample", str(made["sample"]), "--out", str(made["out"])], work)
    assert r.returncode == 1
    assert f"{N - 1} rows, expected {N}" in r.stderr
    assert "Traceback" not in r.stderr


def test_headline_metrics_hold_each_file_and_the_best(inputs, tmp_path):
    metrics = tmp_path / "metrics.json"
    make_submissions(inputs["ens"], inputs["stu"], inputs["sample"], inputs["out"], backbones=BACKBONES,
                     metrics_json=metrics)
    m = json.loads(metrics.read_text())
    best = max(TEST_ACC, key=TEST_ACC.get)
    assert m["best"] == {"file": f"{best}.csv", "test_accuracy": pytest.approx(TEST_ACC[best], abs=1e-4)}
    assert set(m["models"]) == set(TEST_ACC)
    assert m["models"]["resnet10t_tta"]["cv_accuracy"] == pytest.approx(TEST_ACC["resnet10t_tta"] - 0.01, abs=1e-4)
    assert m["models"]["student"]["cv_accuracy"] is None  # no CV for the student: null, not NaN
    assert set(m) == {"models", "best", "test_seen"}  # minutes: data/timing.json's alone, not a second column each


def test_a_test_set_in_training_marks_every_file_seen(inputs, tmp_path):
    """data.train_on_test: the ensemble stage found the test images among the training images (test_seen)."""
    scores = json.loads((inputs["ens"] / "scores.json").read_text())
    (inputs["ens"] / "scores.json").write_text(json.dumps({**scores, "test_seen": True}))
    metrics = tmp_path / "metrics.json"
    board = make_submissions(inputs["ens"], inputs["stu"], inputs["sample"], inputs["out"], backbones=BACKBONES,
                             metrics_json=metrics)
    assert board["test_seen"].all() and pd.read_csv(inputs["out"] / "leaderboard.csv")["test_seen"].all()
    assert json.loads(metrics.read_text())["test_seen"] is True
    (inputs["ens"] / "scores.json").write_text(json.dumps(scores))
    board = make_submissions(inputs["ens"], inputs["stu"], inputs["sample"], inputs["out"], backbones=BACKBONES)
    assert not board["test_seen"].any()
