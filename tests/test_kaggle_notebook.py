"""notebooks/kaggle.ipynb, the notebook a student imports into Kaggle: valid, running the README's `gpu` preset on the
competition's input folder, which it only reads."""
from __future__ import annotations

import re
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
NB = nbformat.read(ROOT / "notebooks" / "kaggle.ipynb", as_version=4)
CODE = "\n".join(c.source for c in NB.cells if c.cell_type == "code")


def test_it_is_a_valid_notebook_with_ids():
    nbformat.validate(NB)
    assert all(c.get("id") for c in NB.cells)


def test_it_runs_the_readmes_gpu_preset_on_the_competitions_input_folder():
    readme = (ROOT / "README.md").read_text()
    gpu = re.search(r"^dvc exp run -n gpu .*$", readme, re.M).group(0)
    expected = gpu.replace("-S data.source=kaggle",
                           "-S data.source=local -S data.path=/kaggle/input/{COMPETITION}")
    assert f"!{expected}" in CODE.splitlines()


def test_its_install_line_is_the_guides():
    guide = (ROOT / "docs" / "guide.md").read_text()
    install = re.search(r"^pip install -q -r requirements.txt.*$", guide, re.M).group(0)
    assert f"!{install}" in CODE.splitlines()


def test_it_only_reads_the_input_folder():
    uses = [line.split("#")[0].strip() for line in CODE.splitlines() if "/kaggle/input" in line.split("#")[0]]
    assert uses and all(re.search(r"data\.path=/kaggle/input/|^previous = f\"/kaggle/input/", u) for u in uses), uses
    # what it copies from there goes into the working copy, and nothing writes under /kaggle/input
    assert 'shutil.copytree(previous, "data/models"' in CODE
    assert not re.search(r"(>|cp .* |mv .* |copytree\([^,]+, *f?\")\s*/kaggle/input", CODE)


def test_it_sends_a_submission_only_when_asked():
    assert "SEND = False" in CODE
    send = CODE.split("if SEND:", 1)
    assert len(send) == 2 and "pipeline.submit -m" in send[1] and "pipeline.submit -m" not in send[0]
