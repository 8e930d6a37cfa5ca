"""notebooks/kaggle.ipynb, the notebook a student imports into Kaggle, run end to end here on the CPU with nbclient
against a fake /kaggle tree (KAGGLE_ROOT): a clone from a file:// URL of this checkout, the install as a pip dry run, a
fake kaggle_secrets module, the README's two GPU presets with tiny params over them, and Run All stopping at a failed
step. Not run on Kaggle."""
from __future__ import annotations

import io
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import nbformat
import pandas as pd
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = Path(__file__).resolve().parents[1]
NB = nbformat.read(ROOT / "notebooks" / "kaggle.ipynb", as_version=4)
CODE = "\n".join(c.source for c in NB.cells if c.cell_type == "code")
SLUG = "fighting-malaria-with-cnns"
# The tiny params over each preset's (ResNet10-T from scratch at 32 px for one epoch; no hub, no GPU): a couple of
# minutes for both presets on 2 cores.
TINY = ["data.img_size=32", "train.backbones=[resnet10t]", "train.pretrained=false", "train.epochs=1",
        "train.num_workers=0", "distill.student=resnet10t", "distill.epochs=1", "distill.timing_images=32",
        "tta.views=[identity]"]


def readme_preset(name: str) -> str:
    return re.search(rf"^dvc exp run -n {re.escape(name)} .*$", (ROOT / "README.md").read_text(), re.M).group(0)


def as_the_notebook_runs_it(line: str, data: Path) -> list[str]:
    """README's preset -S list with the data read from the folder found, for the competition, and the tiny params."""
    args = shlex.split(line.replace("-S data.source=kaggle", f"-S data.source=local -S data.path={data} "
                                                             f"-S data.competition={SLUG}"))
    sets = [value for flag, value in zip(args, args[1:]) if flag == "-S"]
    for kv in TINY:
        key = kv.split("=")[0]
        hit = next((i for i, a in enumerate(sets) if a.split("=")[0].lstrip("+") == key), None)
        if hit is None:
            sets.append(kv)
        else:
            sets[hit] = kv
    return sets


# -- what can be read without running it ----------------------------------------------------------------------------

def test_it_is_a_valid_notebook_with_ids():
    nbformat.validate(NB)
    assert all(c.get("id") for c in NB.cells)


@pytest.mark.parametrize("name, variable", [("gpu-fast", "FAST"), ("gpu", "GPU")])
def test_it_holds_the_readmes_preset_lines(name, variable):
    assert f'{variable} = "{readme_preset(name)}"' in CODE.splitlines()


def test_the_guides_commands_are_the_readmes_gpu_fast():
    """The guide's by-hand line (Kaggle's terminal) and its Colab cell run the README's gpu-fast list."""
    guide = (ROOT / "docs" / "guide.md").read_text()
    fast = readme_preset("gpu-fast")
    mounted = f"/kaggle/input/competitions/{SLUG}"
    assert fast.replace("-n gpu-fast -S data.source=kaggle", f"-n kaggle -S data.source=local -S data.path={mounted} "
                        f"-S data.competition={SLUG}") in guide.splitlines()
    colab = re.search(r'^fast = \((.*?)\)  #', guide, re.M | re.S).group(1)
    assert " ".join(re.findall(r'"(.*?) ?"', colab)) == fast.replace(" -S data.source=kaggle", "")


def test_every_command_is_a_step_that_stops_run_all():
    """No `!command` or `%magic` line (a failing one does not raise): every command goes through step()."""
    assert not [line for line in CODE.splitlines() if line.strip().startswith(("!", "%"))]
    assert not re.search(r"subprocess\.(run|call|check_call|check_output)|os\.system|get_ipython", CODE)
    assert 'raise StepFailed(f"Step \'{name}\' failed' in CODE


def test_it_offers_the_t4_not_the_p100():
    guide = (ROOT / "docs" / "guide.md").read_text()
    kaggle = guide[guide.index("### Kaggle notebook"):guide.index("### A Mac")]
    for page in (NB.cells[0].source, kaggle):
        assert "GPU T4 x2" in page and "not the P100" in page and "or a P100" not in page
    assert "**Not run on Kaggle.**" in NB.cells[0].source and "Not run on Kaggle" in kaggle


def test_it_sends_only_when_asked():
    assert "SEND = False" in CODE
    before, after = CODE.split("if SEND:\n", 1)
    assert "send the submission" in after and "send the submission" not in before


# -- Run All on a fake /kaggle ------------------------------------------------------------------------------------

def snapshot_repo(dst: Path) -> str:
    """This checkout as it is now (tracked and new files, not ignored ones) committed in a fresh repository: what a
    clone of this version from its git host holds. Returns its file:// URL."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        if (ROOT / rel).is_file():  # a tracked file deleted in the working tree is left out
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dst / rel)
    git = ["git", "-c", "user.email=ci@example.com", "-c", "user.name=ci"]
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "snapshot"]):
        subprocess.run(git + cmd, cwd=dst, check=True, capture_output=True)
    return dst.as_uri()


def sample_bundle(zip_path: Path, dst: Path, every: int = 6) -> None:
    """The course sample's files as Kaggle lists them (train.zip, train_labels.csv, test.zip, test_labels.csv,
    hidden_test.zip, sample_submission.csv), with every sixth cell of each split (500 / 100 / 100 real cells): the
    same layout in fewer minutes."""
    with zipfile.ZipFile(zip_path) as outer:
        for csv_name, zip_name in (("train_labels.csv", "train.zip"), ("test_labels.csv", "test.zip"),
                                   ("sample_submission.csv", "hidden_test.zip")):
            rows = outer.read(csv_name).decode().splitlines()
            kept = rows[1::every]
            (dst / csv_name).write_text("\n".join([rows[0], *kept]) + "\n")
            names = {r.split(",")[0] for r in kept}
            with zipfile.ZipFile(io.BytesIO(outer.read(zip_name))) as inner, \
                    zipfile.ZipFile(dst / zip_name, "w") as out:
                for member in inner.namelist():
                    if member.rsplit("/", 1)[-1] in names:
                        out.writestr(member, inner.read(member))


def set_writable(root: Path, writable: bool) -> None:
    for p in [root, *root.rglob("*")]:
        mode = p.stat().st_mode
        p.chmod(mode | stat.S_IWUSR if writable else mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


class Run:
    """One Run All of the notebook: its cells' text outputs (1-based), the error that stopped it, the fake tree."""

    def __init__(self, kaggle: Path, nb, error: CellExecutionError | None):
        self.kaggle, self.nb, self.error = kaggle, nb, error
        self.working, self.repo = kaggle / "working", kaggle / "working" / "malaria"

    def text(self, cell: int) -> str:
        out = []
        for o in self.nb.cells[cell - 1].get("outputs", []):
            out.append(o.get("text", "") if o.output_type == "stream" else
                       f"{o.get('ename', '')}: {o.get('evalue', '')}" if o.output_type == "error" else
                       o.get("data", {}).get("text/plain", ""))
        return "".join(out)

    def ran(self, cell: int) -> bool:
        return self.nb.cells[cell - 1].get("execution_count") is not None


def run_all(tmp: Path, shared_data: Path, monkeypatch, *, layout: str, settings: dict, overrides: list[str],
            previous: str = "", secrets: str = "KAGGLE_API_TOKEN=fake-token") -> Run:
    """Build a fake /kaggle (the course sample under input/ in `layout`, read only), set the notebook's settings as a
    student would, and Run All with nbclient; returns the Run, stopped or not."""
    kaggle = tmp / "kaggle"
    data = kaggle / "input" / layout
    data.mkdir(parents=True)
    sample_bundle(shared_data / "nndl-hw2-sample.zip", data)
    if previous:  # an earlier version's output as an input: its malaria/data/models
        (kaggle / "input" / previous / "malaria" / "data" / "models" / "resnet10t").mkdir(parents=True)
        (kaggle / "input" / previous / "malaria" / "data" / "models" / "resnet10t" / "timing.json").write_text("{}")
    (kaggle / "working").mkdir()
    set_writable(kaggle / "input", False)
    before = {str(p): p.stat().st_mtime_ns for p in (kaggle / "input").rglob("*")}
    nb = nbformat.read(ROOT / "notebooks" / "kaggle.ipynb", as_version=4)
    cell = nb.cells[1]
    for name, value in {"REPO_URL": snapshot_repo(tmp / "origin"), **settings}.items():
        cell.source, n = re.subn(rf"^{name} = .*?(  +#|$)", f"{name} = {value!r}\\1", cell.source, flags=re.M)
        assert n == 1, f"no {name} in the settings cell"
    env = {"KAGGLE_ROOT": str(kaggle), "MALARIA_PIP_DRY_RUN": "1", "MALARIA_PRESET_OVERRIDES": " ".join(overrides),
           "PYTHONPATH": str(ROOT / "tests" / "fake_kaggle"), "FAKE_KAGGLE_SECRETS": secrets,
           "HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1", "DVC_NO_ANALYTICS": "1",
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
           "HOME": str(tmp / "home"),  # no ~/.kaggle, no git identity: as a fresh notebook
           "MPLCONFIGDIR": os.environ.get("MPLCONFIGDIR") or str(Path.home() / ".config" / "matplotlib")}  # its fonts
    (tmp / "home").mkdir()
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    for k in ("KAGGLE_API_TOKEN", "KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_CONFIG_DIR"):
        monkeypatch.delenv(k, raising=False)
    error = None
    try:
        NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp)}}).execute()
    except CellExecutionError as e:
        error = e
    finally:
        after = {str(p): p.stat().st_mtime_ns for p in (kaggle / "input").rglob("*")}
        set_writable(kaggle / "input", True)
    assert after == before, "the notebook wrote under /kaggle/input"
    run = Run(kaggle, nb, error)
    for i, c in enumerate(nb.cells, 1):  # shown with -s, or when a test fails
        if c.cell_type == "code":
            print(f"----- cell {i} ({c.id}){'' if run.ran(i) else ': not run'}\n{run.text(i)}")
    return run


@pytest.fixture(scope="module")
def full_run(shared_data, tmp_path_factory) -> Run:
    """Run All with RUN_FULL = True, the competition under competitions/<slug>/ (Kaggle's layout today)."""
    with pytest.MonkeyPatch.context() as mp:
        return run_all(tmp_path_factory.mktemp("nb"), shared_data, mp, layout=f"competitions/{SLUG}",
                       settings={"RUN_FULL": True, "REQUIRE_GPU": False}, overrides=TINY)


def test_run_all_completes_and_finds_the_competition_in_todays_layout(full_run):
    assert full_run.error is None, full_run.error
    assert all(full_run.ran(i) for i, c in enumerate(full_run.nb.cells, 1) if c.cell_type == "code")
    data = full_run.kaggle / "input" / "competitions" / SLUG
    assert f"The competition's files: {data}\n" in full_run.text(7)
    assert "No earlier version's models among the inputs" in full_run.text(7)


def test_it_installs_keeping_the_images_packages(full_run):
    text = full_run.text(5)
    kept = text.split("Kept from the image: ")[1].splitlines()[0].split(", ")
    assert [k.split(" ")[0] for k in kept] == ["torch", "torchvision", "numpy", "pandas", "pillow"]
    assert "--dry-run" in text and "requirements.kept.txt -c" in text and "Dry run: nothing installed" in text


def test_cards_and_token_are_checked_before_training(full_run):
    text = full_run.text(6)
    assert "No CUDA card is visible" in text  # REQUIRE_GPU = False here; True would stop (tests/test_cards.py)
    assert "Kaggle token: from the notebook's Secrets (KAGGLE_API_TOKEN)" in text
    assert "fake-token" not in "".join(full_run.text(i) for i in range(1, len(full_run.nb.cells) + 1))


@pytest.mark.parametrize("cell, preset", [(8, "gpu-fast"), (9, "gpu")])
def test_it_runs_the_readmes_presets_on_the_folder_found(full_run, cell, preset):
    """The README line's -S list (data read from the folder found, for COMPETITION), applied by DVC's own code to the
    committed params.yaml, then `dvc repro` and `dvc exp save` under the preset's name."""
    data = full_run.kaggle / "input" / "competitions" / SLUG
    text = full_run.text(cell)
    applied = [shlex.split(line.split(" params.yaml with ", 1)[1])[1::2] for line in text.splitlines()
               if line.startswith(f"[{preset}] params.yaml with ")]
    assert applied == [as_the_notebook_runs_it(readme_preset(preset), data)]
    commands = [line.split("$ ", 1)[1] for line in text.splitlines() if line.startswith(f"[{preset}] $ ")]
    assert [c.split(" ", 1)[1] for c in commands] == ["checkout -- params.yaml", "-m dvc repro",
                                                     f"-m dvc exp save --force -n {preset}"]
    assert re.search(r"epoch 1/1 train_loss=", text)  # the training log streams into the cell
    # Which model of how many starts, and each trained epoch's seconds with the model's time left.
    first = {"gpu-fast": r"1 of 1 for resnet10t \(backbone 1 of 1\): on all training cells",
             "gpu": r"1 of 6 for resnet10t \(backbone 1 of 1\): fold 0 of 5"}[preset]
    assert re.search(rf"Model {first}\n", text)
    refit = "Model 6 of 6 for resnet10t (backbone 1 of 1): the refit on all training cells"
    assert preset == "gpu-fast" or refit in text
    assert re.search(r"resnet10t[^:\n]*: epoch 1/1 took \d+ s; (about|at most) 0\.0 min left for this model", text)
    saved = subprocess.run([sys.executable, "-m", "dvc", "exp", "show", "--json"], cwd=full_run.repo,
                           capture_output=True, text=True, check=True).stdout
    exp = next(e for b in json.loads(saved) for e in b.get("experiments") or [] if e.get("name") == preset)
    params = exp["revs"][0]["data"]["params"]["params.yaml"]["data"]
    assert params["data"]["path"] == str(data) and params["data"]["competition"] == SLUG


def test_submission_csv_is_the_better_runs_best_file_with_its_report(full_run):
    working, repo = full_run.working, full_run.repo
    kept = json.loads((working / "submission.json").read_text())
    said_fast, said_gpu = full_run.text(8).splitlines()[-1], full_run.text(9).splitlines()[-1]
    fast = float(re.search(r"gpu-fast's \S+ \(test accuracy ([\d.]+)\)", said_fast).group(1))
    board = pd.read_csv(repo / "submissions" / "latest" / "leaderboard.csv")  # the gpu run's
    if kept["preset"] == "gpu":
        assert board["test_accuracy"].iat[0] > fast and said_gpu.startswith("submission.csv is now gpu's")
        assert (working / "submission.csv").read_bytes() == (repo / "submissions/latest" / kept["file"]).read_bytes()
        assert (working / "report.pdf").read_bytes() == (repo / "notebooks" / "report.pdf").read_bytes()
    else:
        assert board["test_accuracy"].iat[0] <= fast and said_gpu.startswith("submission.csv stays gpu-fast's")
    sub, sample = (pd.read_csv(p) for p in (working / "submission.csv", repo / "data/prepared/sample_submission.csv"))
    assert list(sub.columns) == list(sample.columns) and sorted(sub.iloc[:, 0]) == sorted(sample.iloc[:, 0])
    assert (working / "report.ipynb").is_file() and (working / "report.pdf").read_bytes().startswith(b"%PDF")
    assert "Dry run, not sent" in full_run.text(10) and "SEND is False: nothing sent" in full_run.text(10)


def test_the_output_is_small(full_run):
    assert not (full_run.repo / "data" / "raw").exists() and not (full_run.repo / ".dvc" / "cache").exists()
    files = sum(len(f) for _, _, f in os.walk(full_run.working))
    git = sum(len(f) for _, _, f in os.walk(full_run.repo / ".git"))
    assert files - git < 400, files - git  # the sample's 700 PNGs are not in it, twice over
    assert re.search(r"The output: [\d.]+ GB in \d+ files", full_run.text(11))


def test_the_old_layout_an_earlier_versions_models_and_a_failing_step(shared_data, tmp_path, monkeypatch):
    """The competition under /kaggle/input/<slug>/ (the old layout), an earlier version's output as an input, no
    Secret; then `dvc exp run` fails (a bad param): Run All stops at that cell, naming the step, and nothing after it
    runs."""
    run = run_all(tmp_path, shared_data, monkeypatch, layout=SLUG, previous="my-malaria-notebook", secrets="",
                  settings={"REQUIRE_GPU": False}, overrides=[*TINY, "train.epochs=0"])
    assert f"The competition's files: {run.kaggle / 'input' / SLUG}\n" in run.text(7)
    models = run.kaggle / "input" / "my-malaria-notebook" / "malaria" / "data" / "models"
    assert f"Models copied back from {models}" in run.text(7)
    copied = run.repo / "data" / "models" / "resnet10t" / "timing.json"
    assert copied.is_file() and copied.parent.stat().st_mode & stat.S_IWUSR  # kept by the run; writable, unlike input
    assert "No Kaggle token (needed only with SEND = True" in run.text(6)
    assert run.error is not None and "StepFailed" in run.text(8) and "Step 'gpu-fast' failed (exit code" in run.text(8)
    assert "train.epochs" in run.text(8)  # the validate stage's message, streamed above the error
    assert not any(run.ran(i) for i in (9, 10, 11)) and not (run.working / "submission.csv").exists()


def test_the_placeholder_url_is_refused_before_cloning(shared_data, tmp_path, monkeypatch):
    nb_settings = {"REPO_URL": "<this repository's URL>"}
    run = run_all(tmp_path, shared_data, monkeypatch, layout=f"competitions/{SLUG}", settings=nb_settings,
                  overrides=TINY)
    assert "Step 'clone' refused: REPO_URL is still the placeholder" in run.text(4)
    assert not run.repo.exists() and not any(run.ran(i) for i in range(5, 12))
