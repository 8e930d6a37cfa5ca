"""Where a run's models live: <models>/<backbone>/fold<k>/ for each fold model and full/ for the model on every
training cell (the refit, or folds.n 0). Torch-free: the stages that only read CSVs use it too."""
from __future__ import annotations

import re
from pathlib import Path

FULL = "full"


def fold_name(k: int) -> str:
    return f"fold{k}"


def fold_dir(models: Path, backbone: str, k: int) -> Path:
    return Path(models) / backbone / fold_name(k)


def full_dir(models: Path, backbone: str) -> Path:
    return Path(models) / backbone / FULL


def fold_dirs(backbone_dir: Path, holding: str | None = None) -> list[Path]:
    """The fold<k>/ folders of one backbone (or one ablation run), in fold order; with `holding`, only those that hold
    that file."""
    dirs = [d for d in Path(backbone_dir).glob("fold*") if re.fullmatch(r"fold\d+", d.name) and d.is_dir()]
    return sorted((d for d in dirs if holding is None or (d / holding).is_file()), key=lambda d: int(d.name[4:]))


def model_folders(n_folds: int) -> list[str]:
    """A backbone's model folders by name: fold0 ... fold<n-1>, or full alone without folds (folds.n 0)."""
    return [fold_name(k) for k in range(n_folds)] or [FULL]


def prediction_dirs(models: Path, backbone: str, refit: bool) -> list[Path]:
    """The folders of the models a backbone's test/hidden predictions come from: its refit or all-cells model (full/)
    when there is one to use (`refit`), else every fold holding a checkpoint. OOF always comes from the folds."""
    return [full_dir(models, backbone)] if refit else fold_dirs(Path(models) / backbone, "checkpoint.pt")
