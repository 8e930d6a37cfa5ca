"""Helpers the test modules share (not fixtures): a temporary copy of the project, `dvc` in it, params edits."""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import nbformat
import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())
REQUIRED_FIGURES = 12  # the report notebook's figures
DVC_ENV = {"NO_ALBUMENTATIONS_UPDATE": "1", "HF_HUB_OFFLINE": "1", "DVC_NO_ANALYTICS": "1", "PYTHONUNBUFFERED": "1"}


def train_cfg(**changes):
    """engine.TrainConfig as the train stage builds it from params.yaml's train section (which holds the defaults),
    seed 0, with the test's changes."""
    from pipeline.lib.training import train_config

    return train_config(PARAMS["train"], changes.pop("seed", 0), **changes)


def with_value(key: str, value, params: dict | None = None) -> dict:
    """A deep copy of `params` (default: params.yaml) with the dotted `key` set to `value`."""
    out = copy.deepcopy(PARAMS if params is None else params)
    *parents, leaf = key.split(".")
    node = out
    for p in parents:
        node = node[p]
    node[leaf] = value
    return out


def project_copy(tmp: Path, **overrides) -> Path:
    """Copy the tracked project files to tmp, apply dotted-key param overrides, and commit (dvclive needs a commit)."""
    dst = tmp / "project"
    dst.mkdir()
    for name in ("pipeline", "notebooks", "submissions", "data/demo.zip", "data/.gitignore", ".dvc", "dvc.yaml",
                 "params.yaml", ".dvcignore", ".gitignore"):
        src = ROOT / name
        (dst / name).parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst / name, ignore=shutil.ignore_patterns("__pycache__", "tmp", "cache"))
        elif src.exists():
            shutil.copy(src, dst / name)
    set_params(dst, **overrides)
    git = ["git", "-c", "user.email=ci@example.com", "-c", "user.name=ci"]
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "tiny"]):
        subprocess.run(git + cmd, cwd=dst, check=True, capture_output=True)
    return dst


def dvc_command(*args: str) -> tuple[list, dict]:
    """The `dvc` of this virtual environment with `args`, and the environment to run it in."""
    env = {**os.environ, **DVC_ENV, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return [str(Path(sys.executable).parent / "dvc"), *args], env


def dvc(project: Path, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
    cmd, env = dvc_command(*args)
    r = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True, timeout=1800)
    assert (r.returncode == 0) == ok, f"dvc {' '.join(args)} exited {r.returncode}:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return r


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def set_params(project: Path, **overrides) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    for key, value in overrides.items():
        params = with_value(key, value, params)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


# The tiny chain's two backbones: the ResNet the student copies, and timm's cheapest network that is not a ResNet (it
# trains about 6x faster than EfficientNet-B0 on the CPU at 32 px; the families' own code is the GPU check's).
TINY_BACKBONES = ("resnet10t", "mobilenetv3_small_050")


def tiny_params(shared_data: Path) -> dict:
    """The tiny configuration of the e2e chain: the real competition sample at 32 px, two backbones, 1 epoch."""
    return {"data.source": "local", "data.path": str(shared_data / "nndl-hw2-sample.zip"), "data.img_size": 32,
            "folds.n": 2, "train.backbones": list(TINY_BACKBONES),
            "train.epochs": 1, "train.batch_size": 128, "train.num_workers": 0, "distill.epochs": 1,
            "distill.timing_images": 32, "tta.views": ["identity", "hflip"]}


TIMING_KEYS = ("ms_per_image", "seconds", "minutes", "wall_s")


def untimed(value):
    """A scores.json's content without its timing keys (they differ between two runs of the same params)."""
    if isinstance(value, dict):
        return {k: untimed(v) for k, v in value.items() if not any(t in k for t in TIMING_KEYS)}
    return [untimed(v) for v in value] if isinstance(value, list) else value


def run_outputs(project: Path) -> dict[str, str]:
    """What a run of the same params must reproduce byte for byte: the submissions, every prediction CSV under data/
    (data/raw aside) and the scores without their timing keys; path -> sha256."""
    csvs = [*(project / "submissions/latest").glob("*.csv"),
            *(p for p in (project / "data").rglob("*.csv") if "raw" not in p.relative_to(project / "data").parts)]
    out = {str(p.relative_to(project)): sha256(p) for p in sorted(csvs)}
    for p in sorted((project / "data").glob("*/scores.json")):
        text = json.dumps(untimed(json.loads(p.read_text())), sort_keys=True)
        out[str(p.relative_to(project))] = hashlib.sha256(text.encode()).hexdigest()
    return out


def check_executed_report(project: Path) -> None:
    """After `dvc repro` in `project`: the executed report has no errors, its figures, and the leaderboard's scores."""
    executed, html = project / "notebooks" / "report.executed.ipynb", project / "notebooks" / "report.html"
    assert executed.is_file(), f"{executed} was not written"
    nb = nbformat.read(executed, as_version=4)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    errors = [f"{o.ename}: {o.evalue}" for o in outputs if o.output_type == "error"]
    assert not errors, f"error outputs in {executed}: {errors}"
    assert any("injected-parameters" in c.metadata.get("tags", []) for c in nb.cells), "no injected parameters"
    images = sum(o.output_type in ("display_data", "execute_result") and "image/png" in o.get("data", {})
                 for o in outputs)
    assert images >= REQUIRED_FIGURES, f"{executed} has {images} figures, expected at least {REQUIRED_FIGURES}"

    scores = [c for c in nb.cells if "scores" in c.metadata.get("tags", [])]
    assert len(scores) == 1, "expected one cell tagged `scores`"
    table = "".join(o.get("data", {}).get("text/html", "") for o in scores[0].outputs)
    rows = re.findall(r"<tr>(.*?)</tr>", table, re.S)
    board = pd.read_csv(project / "submissions" / "latest" / "leaderboard.csv")
    assert len(rows) == len(board), f"the scores table has {len(rows)} rows, the leaderboard {len(board)}"
    for row, (_, r) in zip(rows, board.iterrows()):  # same order: best first
        assert f"<td>{r['file']}</td>" in row, f"scores table row {row!r} is not {r['file']}"
        assert f"<td>{r['test_accuracy']:.4f}</td>" in row, f"{r['file']}: test accuracy differs from the leaderboard"
        assert f"<td>{r['test_roc_auc']:.4f}</td>" in row, f"{r['file']}: test AUC differs from the leaderboard"

    assert html.is_file(), f"{html} was not written"
    text = html.read_text(encoding="utf-8")
    assert text.count("data:image/png;base64") >= REQUIRED_FIGURES, "figures are not embedded in the HTML"
    assert board["file"].iat[0] in text
    issues = pd.read_csv(project / "data" / "student" / "label_issues.csv")  # the distill stage's label check
    assert f"{int(issues['flagged'].sum())} of {len(issues)} training cells are flagged" in text

    import pypdf

    best = f"{board['test_accuracy'].iat[0]:.4f}"
    no_input = (project / "notebooks" / "report.no-input.html").read_text(encoding="utf-8")
    assert no_input.count("data:image/png;base64") >= REQUIRED_FIGURES and best in no_input
    assert 'jp-InputArea-editor"' not in no_input and "def grad_cam(" not in no_input, "code in report.no-input.html"
    pdf = pypdf.PdfReader(project / "notebooks" / "report.pdf")
    assert len(pdf.pages) > 5, f"report.pdf has {len(pdf.pages)} pages"
    assert best in "".join(page.extract_text() for page in pdf.pages), f"report.pdf lacks the best score {best}"
    card = (project / "notebooks" / "model_card.md").read_text(encoding="utf-8")
    student = yaml.safe_load((project / "params.yaml").read_text())["distill"]["student"]
    assert f"`{student}`" in card and best in card, "the model card does not name the student and the best score"


def module_file(module: str) -> Path:
    """pipeline.lib.engine -> ROOT/pipeline/lib/engine.py."""
    return ROOT / (module.replace(".", "/") + ".py")


def direct_imports(text: str) -> list[str]:
    """The pipeline modules (dotted names) that code imports itself, lazy imports inside functions included."""
    found = []
    for package, wrapped, names in re.findall(r"^[ \t]*from (pipeline(?:\.\w+)*) import (?:\(([^)]*)\)|([\w ,]+))",
                                              text, re.M):
        names = wrapped or names
        if module_file(package).is_file():
            found.append(package)  # from pipeline.lib.engine import fit
            continue
        for name in re.findall(r"(\w+)(?:\s+as\s+\w+)?", names):  # from pipeline.lib import engine as e
            if name != "as" and module_file(f"{package}.{name}").is_file():
                found.append(f"{package}.{name}")
    found += re.findall(r"^\s*import (pipeline(?:\.\w+)+)", text, re.M)
    return found


@contextmanager
def pipeline_log():
    """The pipeline's log records (INFO and up) while inside: pytest's caplog is per test, a module fixture needs its
    own."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    logger = logging.getLogger("pipeline")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def linked_user_folder(tmp_path: Path, content: bytes) -> tuple[Path, Path]:
    """A user's folder holding competition.zip (`content`), and tmp_path/raw, a link to it: (the folder, the link)."""
    mine = tmp_path / "my_data"
    mine.mkdir()
    (mine / "competition.zip").write_bytes(content)
    link = tmp_path / "raw"
    link.symlink_to(mine, target_is_directory=True)
    return mine, link
