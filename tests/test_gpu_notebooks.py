"""What the Kaggle/Colab section of docs/guide.md relies on: a read-only input folder, and an install that keeps the
torch the notebook already has."""
from __future__ import annotations

import json
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from pipeline.download import download
from pipeline.prepare import prepare

REPO = Path(__file__).resolve().parents[1]


def read_only(root: Path) -> dict[str, float]:
    """Make a tree read-only, as /kaggle/input is; returns its files' mtimes, to show nothing was written."""
    for p in sorted(root.rglob("*"), reverse=True) + [root]:
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    return {str(p): p.stat().st_mtime for p in root.rglob("*")}


@pytest.fixture
def writable_again():
    roots = []
    yield roots.append
    for root in roots:  # let pytest clean up its tmp folder
        for p in [root, *root.rglob("*")]:
            p.chmod(p.stat().st_mode | stat.S_IWUSR)


@pytest.mark.parametrize("form", ["bundle of zips", "unzipped folders"])
def test_competition_data_from_a_read_only_input_folder(shared_data, make_competition, tmp_path, writable_again, form):
    if form == "bundle of zips":  # the course's files as Kaggle lists them: train.zip, test.zip, ... and the CSVs
        src = tmp_path / "input" / "competition"
        with zipfile.ZipFile(shared_data / "nndl-hw2-sample.zip") as z:
            z.extractall(src)
    else:
        src = make_competition("input")
    writable_again(src)
    before = read_only(src)
    raw = tmp_path / "working" / "raw"
    download(raw, source="local", path=str(src), competition="", dataset="", synthetic={}, seed=0)
    df = prepare(raw, tmp_path / "working" / "prepared", img_size=32, holdout_fraction=0.15, seed=0)
    assert set(df["split"]) == {"train", "test", "hidden"}
    assert {str(p): p.stat().st_mtime for p in src.rglob("*")} == before  # nothing written to the input


def test_install_line_keeps_the_torch_already_installed(tmp_path):
    """`pip install -r requirements.txt` in an environment that has a torch within the range (here this one's, as a
    Kaggle or Colab image has its own) resolves without replacing torch or torchvision."""
    report = tmp_path / "report.json"
    run = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--report", str(report),
                          "-r", str(REPO / "requirements.txt")], capture_output=True, text=True, timeout=600)
    if run.returncode and ("No matching distribution" in run.stderr or "Could not fetch" in run.stderr):
        pytest.skip(f"the package index cannot be reached: {run.stderr.strip().splitlines()[-1]}")
    assert run.returncode == 0, run.stderr[-2000:]
    planned = {item["metadata"]["name"].lower() for item in json.loads(report.read_text())["install"]}
    assert not planned & {"torch", "torchvision"}, planned
