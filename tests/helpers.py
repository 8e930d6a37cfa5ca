"""Helpers the test modules share (not fixtures): a temporary copy of the project, `dvc` in it, params edits."""
from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())
DVC_ENV = {"NO_ALBUMENTATIONS_UPDATE": "1", "HF_HUB_OFFLINE": "1", "DVC_NO_ANALYTICS": "1", "PYTHONUNBUFFERED": "1"}


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


def tiny_params(shared_data: Path) -> dict:
    """The tiny configuration of the e2e chain: the real competition sample at 32 px, two backbones, 1 epoch."""
    return {"data.source": "local", "data.path": str(shared_data / "nndl-hw2-sample.zip"), "data.img_size": 32,
            "folds.n": 2, "train.backbones": ["resnet10t", "efficientnet_b0"],
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
