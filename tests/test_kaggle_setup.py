"""What notebooks/kaggle.ipynb relies on, without a notebook: the competition's files and an earlier version's models
found under /kaggle/input in today's layout and the old one, the install that keeps the image's packages (resolved by
pip against a torch newer than requirements.txt allows), the better submission kept, the token from Kaggle Secrets."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from pipeline.lib.common import PipelineError
from pipeline.lib.kaggle_notebook import (NotebookError, find_competition, find_previous_models, publish_if_better,
                                      trim_output)

ROOT = Path(__file__).resolve().parents[1]
FAKE_KAGGLE = Path(__file__).parent / "fake_kaggle"
SLUG = "fighting-malaria-with-cnns"


def bundle(folder: Path, unzipped: bool = False) -> Path:
    """The competition's files as Kaggle lists them (empty stand-ins): the CSVs and the zips, or train/ unzipped."""
    folder.mkdir(parents=True)
    for name in ("train_labels.csv", "test_labels.csv", "sample_submission.csv") + (
            () if unzipped else ("train.zip", "test.zip", "hidden_test.zip")):
        (folder / name).write_text("")
    if unzipped:
        for name in ("train", "test", "hidden_test"):
            (folder / name).mkdir()
    return folder


def test_todays_layout_first(tmp_path):
    new = bundle(tmp_path / "competitions" / SLUG)
    bundle(tmp_path / SLUG)  # an old-style copy too: today's layout wins, no question asked
    assert find_competition(tmp_path, SLUG) == new


def test_the_old_layout_and_unzipped_folders(tmp_path):
    old = bundle(tmp_path / SLUG, unzipped=True)
    assert find_competition(tmp_path, SLUG) == old


def test_the_download_zip_as_on_drive(tmp_path):
    (tmp_path / f"{SLUG}.zip").write_bytes(b"")
    assert find_competition(tmp_path, SLUG) == tmp_path / f"{SLUG}.zip"


def test_a_search_finds_the_one_folder_elsewhere(tmp_path):
    """A dataset of the same files under another name (COMPETITION names the submissions' target, not the folder)."""
    other = bundle(tmp_path / "datasets" / "someone" / "malaria-copy" / "files")
    assert find_competition(tmp_path, SLUG) == other


def test_several_candidates_stop_and_are_listed(tmp_path):
    """An earlier version's output (its malaria/data/raw) and a dataset: the notebook cannot tell which to use."""
    raw = bundle(tmp_path / "notebooks" / "me" / "my-malaria" / "malaria" / "data" / "raw", unzipped=True)
    other = bundle(tmp_path / "cells-dataset")
    with pytest.raises(NotebookError) as e:
        find_competition(tmp_path, SLUG)
    assert str(raw) in str(e.value) and str(other) in str(e.value) and "DATA_DIR" in str(e.value)
    assert find_competition(tmp_path, SLUG, chosen=str(other)) == other


def test_none_says_how_to_add_it(tmp_path):
    (tmp_path / "something-else").mkdir()
    with pytest.raises(NotebookError, match=f"Add Input → Competitions → {SLUG}"):
        find_competition(tmp_path, SLUG)
    with pytest.raises(NotebookError, match="DATA_DIR = .* does not hold"):
        find_competition(tmp_path, SLUG, chosen=str(tmp_path / "something-else"))


def test_an_earlier_versions_models_in_either_layout(tmp_path):
    assert find_previous_models(tmp_path) is None
    new = tmp_path / "notebooks" / "me" / "my-malaria" / "malaria" / "data" / "models"
    new.mkdir(parents=True)
    assert find_previous_models(tmp_path) == new
    old = tmp_path / "older-malaria" / "malaria" / "data" / "models"
    old.mkdir(parents=True)
    with pytest.raises(NotebookError, match="Several inputs hold an earlier version's models") as e:
        find_previous_models(tmp_path)
    assert str(new) in str(e.value) and str(old) in str(e.value)
    assert find_previous_models(tmp_path, "older-malaria") == old
    assert find_previous_models(tmp_path, "my-malaria") == new
    with pytest.raises(NotebookError, match="PREVIOUS = 'gone'"):
        find_previous_models(tmp_path, "gone")


def fake_image_packages(site: Path, torch_version: str = "2.99.0", vision_version: str = "0.99.0") -> None:
    """Installed-package records of a torch and torchvision newer than requirements.txt allows, as a notebook image
    could have: pip and importlib.metadata see them first on PYTHONPATH (there is no code behind them)."""
    for name, version, requires in (("torch", torch_version, ""),
                                    ("torchvision", vision_version, f"Requires-Dist: torch=={torch_version}\n")):
        info = site / f"{name}-{version}.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n{requires}")
        (info / "INSTALLER").write_text("pip\n")
        (info / "RECORD").write_text("")


def test_the_install_keeps_a_torch_newer_than_our_cap(tmp_path):
    """requirements.txt caps torch (our package mirror's limit): with it, pip would replace the image's newer torch.
    The notebook's install drops the image's packages from the requirements and pins them: pip resolves it with
    nothing of theirs to install, offline (every other requirement is installed here)."""
    site = tmp_path / "image-site"
    fake_image_packages(site)
    # No pip configuration: a machine's own (this one's caps torch with a constraints file) is not the image's.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)]), "PIP_CONFIG_FILE": os.devnull,
           "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    made = subprocess.run(
        [sys.executable, "-c", "import json, sys; from pathlib import Path; from pipeline.lib.kaggle_notebook import "
         "kept_install; r, c, kept = kept_install(Path(sys.argv[1]), Path(sys.argv[2])); print(json.dumps([str(r), "
         "str(c), kept]))", str(ROOT / "requirements.txt"), str(tmp_path / "install")],
        env=env, capture_output=True, text=True, check=True)
    req, cons, kept = json.loads(made.stdout)
    assert kept["torch"] == "2.99.0" and kept["torchvision"] == "0.99.0" and set(kept) == {
        "torch", "torchvision", "numpy", "pandas", "pillow"}
    caps = {r.name.lower(): r.specifier for r in map(Requirement, filter(None, (
        line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines())))}
    assert not caps["torch"].contains("2.99.0")  # as written, requirements.txt would downgrade this image's torch
    kept_lines = [line for line in Path(req).read_text().splitlines() if line and not line.startswith("#")]
    assert not {Requirement(line.split("#")[0]).name.lower() for line in kept_lines} & set(kept)
    assert Path(cons).read_text().splitlines()[:2] == ["torch==2.99.0", "torchvision==0.99.0"]
    report = tmp_path / "report.json"
    run = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--quiet", "--report",
                          str(report), "-r", req, "-c", cons], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(report.read_text())["install"] == []  # everything resolved against what is installed


def leaderboard(folder: Path, rows: list[tuple[str, float]]) -> None:
    (folder / "submissions" / "latest").mkdir(parents=True, exist_ok=True)
    lines = ["file,cv_accuracy,test_accuracy"] + [f"{f},,{a}" for f, a in rows]
    (folder / "submissions" / "latest" / "leaderboard.csv").write_text("\n".join(lines) + "\n")
    for f, _ in rows:
        (folder / "submissions" / "latest" / f).write_text(f"id,label\n{f},1\n")
    (folder / "notebooks").mkdir(exist_ok=True)
    (folder / "notebooks" / "report.pdf").write_text(f"report of {rows[0][0]}")


def test_submission_replaced_only_by_a_better_file(tmp_path):
    repo, working = tmp_path / "malaria", tmp_path
    leaderboard(repo, [("ensemble.csv", 0.95), ("student.csv", 0.94)])
    assert "now gpu-fast's ensemble.csv (test accuracy 0.95)" in publish_if_better(repo, working, "gpu-fast")
    assert (working / "submission.csv").read_text() == "id,label\nensemble.csv,1\n"
    assert (working / "report.pdf").read_text() == "report of ensemble.csv"
    leaderboard(repo, [("student_tta.csv", 0.95)])  # as good is not better
    assert "stays gpu-fast's ensemble.csv" in publish_if_better(repo, working, "gpu")
    assert (working / "submission.csv").read_text() == "id,label\nensemble.csv,1\n"
    assert (working / "report.pdf").read_text() == "report of ensemble.csv"
    leaderboard(repo, [("ensemble_tta.csv", 0.97)])
    said = publish_if_better(repo, working, "gpu")
    assert "now gpu's ensemble_tta.csv (test accuracy 0.97), replacing gpu-fast's ensemble.csv (0.95)" in said
    assert (working / "submission.csv").read_text() == "id,label\nensemble_tta.csv,1\n"
    assert json.loads((working / "submission.json").read_text()) == {
        "preset": "gpu", "file": "ensemble_tta.csv", "test_accuracy": 0.97}


def test_the_output_is_trimmed(tmp_path):
    for rel in ("data/raw/train/a.png", ".dvc/cache/files/md5/ab/cd", "data/prepared/images.npy",
                "data/prepared/index.csv", "data/models/resnet10t/full/checkpoint.pt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x" * 10)
    assert trim_output(tmp_path) == {"data/raw": 10, ".dvc/cache": 10, "data/prepared/images.npy": 10}
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()) == [
        "data/models/resnet10t/full/checkpoint.pt", "data/prepared/index.csv"]


@pytest.fixture
def kaggle_notebook_env(monkeypatch, tmp_path):
    """Inside a Kaggle notebook (the fake kaggle_secrets module importable), no credentials anywhere else."""
    monkeypatch.syspath_prepend(str(FAKE_KAGGLE))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for name in ("KAGGLE_API_TOKEN", "KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_CONFIG_DIR", "XDG_CONFIG_HOME",
                 "FAKE_KAGGLE_SECRETS"):
        monkeypatch.delenv(name, raising=False)
    yield monkeypatch
    sys.modules.pop("kaggle_secrets", None)  # out of Kaggle again for the next tests


@pytest.mark.parametrize("attached, found", [
    ("KAGGLE_API_TOKEN=tok-123", ("KAGGLE_API_TOKEN",)),
    ("KAGGLE_USERNAME=me,KAGGLE_KEY=key-456", ("KAGGLE_USERNAME", "KAGGLE_KEY")),
    ("KAGGLE_USERNAME=me", ()),  # half a legacy pair is no credential
    ("", ())])
def test_the_token_comes_from_kaggle_secrets(kaggle_notebook_env, attached, found):
    from pipeline.lib.kaggle_client import credentials_from_kaggle_secrets, in_kaggle_notebook, kaggle_credentials_present

    kaggle_notebook_env.setenv("FAKE_KAGGLE_SECRETS", attached)
    assert in_kaggle_notebook() and not kaggle_credentials_present()
    assert credentials_from_kaggle_secrets() == found
    assert kaggle_credentials_present() is bool(found)  # in this process's environment now, for the kaggle client
    for kv in filter(None, attached.split(",")):
        name, value = kv.split("=")
        assert os.environ.get(name) == (value if found else None)


def test_no_secret_says_how_to_attach_one(kaggle_notebook_env):
    from pipeline.lib.kaggle_client import kaggle_api

    with pytest.raises(PipelineError) as e:
        kaggle_api()
    for needed in ("Add-ons → Secrets", "KAGGLE_API_TOKEN", "KAGGLE_USERNAME", "KAGGLE_KEY", "Settings → API"):
        assert needed in str(e.value), str(e.value)


def test_outside_kaggle_no_secrets_are_asked_for(monkeypatch, tmp_path):
    from pipeline.lib.kaggle_client import credentials_from_kaggle_secrets, in_kaggle_notebook

    assert not in_kaggle_notebook()  # the fake module is not on sys.path here
    assert credentials_from_kaggle_secrets() == ()
