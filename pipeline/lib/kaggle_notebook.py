"""What notebooks/kaggle.ipynb does besides running commands: find the competition's files and an earlier version's
models under /kaggle/input, install keeping the image's own packages, keep the better submission, trim the output.
Standard library only: the notebook imports it before the install."""
from __future__ import annotations

import csv
import importlib.metadata
import json
import os
import re
import shutil
from pathlib import Path

# The image's builds of these are kept, whatever their versions: pip must never replace the image's CUDA torch.
KEPT = ("torch", "torchvision", "numpy", "pandas", "pillow")
# How deep the search under /kaggle/input goes: an earlier version's output holds malaria/data/raw at depth 6
# (notebooks/<user>/<slug>/malaria/data/raw).
SEARCH_DEPTH = 6
# Folders never searched into: image folders (thousands of files) and the checkout's own machinery.
NOT_SEARCHED = {"train", "test", "hidden_test", ".git", ".dvc", "models", "prepared", "node_modules"}


class NotebookError(RuntimeError):
    """A setting or an input the notebook cannot go on with; the message says what to change."""


def is_bundle(folder: Path) -> bool:
    """Whether `folder` holds the competition's files: train_labels.csv with train.zip or a train/ folder."""
    return (folder / "train_labels.csv").is_file() and ((folder / "train.zip").is_file() or (folder / "train").is_dir())


def search(root: Path, match, depth: int = SEARCH_DEPTH) -> list[Path]:
    """Folders under `root` (at most `depth` levels down) for which `match(folder)` holds; none searched below one."""
    found, level = [], [root]
    for _ in range(depth):
        below = []
        for folder in level:
            try:
                children = sorted(p for p in folder.iterdir() if p.is_dir() and p.name not in NOT_SEARCHED)
            except OSError:  # unreadable: nothing to find there
                continue
            for child in children:
                (found if match(child) else below).append(child)
        level = below
    return sorted(found)


def find_competition(input_root: Path, slug: str, chosen: str = "") -> Path:
    """The competition's folder: `chosen` when set, else competitions/<slug>/ (Kaggle's layout today), else <slug>/
    (the old one) or the download <slug>.zip (on Drive), else the one folder under `input_root` that holds its files;
    several: stop and list them."""
    if chosen:
        if not is_bundle(Path(chosen)):
            raise NotebookError(f"DATA_DIR = {chosen!r} does not hold the competition's files (train_labels.csv with "
                                "train.zip or train/).")
        return Path(chosen)
    for folder in (input_root / "competitions" / slug, input_root / slug):
        if is_bundle(folder):
            return folder
    if (input_root / f"{slug}.zip").is_file():
        return input_root / f"{slug}.zip"
    found = search(input_root, is_bundle)
    if len(found) == 1:
        return found[0]
    if not found:
        raise NotebookError(
            f"The competition's files (train_labels.csv with train.zip or train/) are nowhere under {input_root}. Add "
            f"them: Add Input → Competitions → {slug} (COMPETITION is {slug!r}: the slug from the competition's URL).")
    listed = "\n".join(f"  {p}" for p in found)
    raise NotebookError(f"Several folders under {input_root} hold the competition's files, and none is "
                        f"competitions/{slug}/ or {slug}/:\n{listed}\nSet DATA_DIR to the one to use (an earlier "
                        "version's output holds a copy in malaria/data/raw), or COMPETITION to the competition's slug.")


def find_previous_models(input_root: Path, previous: str = "") -> Path | None:
    """An earlier version's models (its output's malaria/data/models) among the inputs: notebooks/<user>/<slug>/
    (Kaggle's layout today) or <slug>/ (the old one); with `previous` set, only under a folder of that name. None
    when there is none to resume from; several: stop and list them."""
    found = [p / "malaria" / "data" / "models" for p in search(
        input_root, lambda p: (p / "malaria" / "data" / "models").is_dir(), depth=3)]
    if previous:
        found = [p for p in found if previous in p.relative_to(input_root).parts[:-3]]
        if not found:
            raise NotebookError(f"PREVIOUS = {previous!r}, but no input folder of that name holds malaria/data/models."
                                " Add that version's output: Add Input → Your Work → Notebooks, or set PREVIOUS = \"\".")
    if len(found) > 1:
        listed = "\n".join(f"  {p}" for p in found)
        raise NotebookError(f"Several inputs hold an earlier version's models:\n{listed}\nSet PREVIOUS to the "
                            "folder name (the notebook's slug) of the one to resume from.")
    return found[0] if found else None


def copy_back(models: Path, dst: Path) -> int:
    """Copy an earlier version's models into `dst`, every file writable (the input's are read-only); the count."""
    n = 0
    for f in sorted(models.rglob("*")):
        if f.is_file():
            target = dst / f.relative_to(models)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, target)
            n += 1
    return n


def requirement_name(line: str) -> str | None:
    """The normalised project name a requirements.txt line asks for (None: a comment or a blank line)."""
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", line.split("#", 1)[0])
    return re.sub(r"[-_.]+", "-", m.group(1)).lower() if m else None


def installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def kept_install(requirements: Path, out_dir: Path) -> tuple[Path, Path, dict[str, str]]:
    """requirements.txt without the KEPT packages the image has (a requirements file), and those pinned to the
    image's versions (a constraints file), so that nothing else installed can replace them either. Returns both
    paths and the kept {name: version}; a KEPT package the image lacks stays a requirement, installed as asked."""
    kept = {n: v for n in KEPT if (v := installed_version(n))}
    lines = [line for line in requirements.read_text().splitlines() if requirement_name(line) not in kept]
    out_dir.mkdir(parents=True, exist_ok=True)
    req, cons = out_dir / "requirements.kept.txt", out_dir / "constraints.kept.txt"
    req.write_text(f"# {requirements.name} without what the image has: {', '.join(kept) or 'nothing'}\n"
                   + "\n".join(lines) + "\n")
    cons.write_text("".join(f"{n}=={v}\n" for n, v in kept.items()))
    return req, cons, kept


def best_row(leaderboard: Path) -> dict:
    """The leaderboard's first row (the best file on the labelled test), with test_accuracy as a float or None."""
    with open(leaderboard, newline="") as f:
        row = next(csv.DictReader(f))
    score = row.get("test_accuracy") or ""
    return {**row, "test_accuracy": float(score) if score.strip() else None}


def publish_if_better(repo: Path, working: Path, preset: str) -> str:
    """Make this run's best file working/submission.csv, with its report at working/report.pdf and report.ipynb,
    unless the file there (recorded in submission.json) scores at least as well on the labelled test. Says which."""
    best = best_row(repo / "submissions" / "latest" / "leaderboard.csv")
    record, out = working / "submission.json", working / "submission.csv"
    new = {"preset": preset, "file": best["file"], "test_accuracy": best["test_accuracy"]}
    old = json.loads(record.read_text()) if record.is_file() and out.is_file() else None
    if old is not None and not (new["test_accuracy"] or 0) > (old["test_accuracy"] or 0):
        return (f"submission.csv stays {old['preset']}'s {old['file']} (test accuracy {old['test_accuracy']}): "
                f"{preset}'s best, {new['file']}, scores {new['test_accuracy']}, not better")
    shutil.copyfile(repo / "submissions" / "latest" / best["file"], out)
    for src, dst in (("notebooks/report.pdf", "report.pdf"), ("notebooks/report.executed.ipynb", "report.ipynb")):
        if (repo / src).is_file():
            shutil.copyfile(repo / src, working / dst)
    record.write_text(json.dumps(new, indent=2) + "\n")
    was = "" if old is None else f", replacing {old['preset']}'s {old['file']} ({old['test_accuracy']})"
    return f"submission.csv is now {preset}'s {best['file']} (test accuracy {best['test_accuracy']}){was}"


def folder_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def trim_output(repo: Path) -> dict[str, int]:
    """Remove from the checkout what a saved version needs not keep and the next one rebuilds from the input: the raw
    copy of the competition's files (tens of thousands of PNGs), DVC's cache (a second copy of everything) and the
    image cache. Models, submissions and reports stay. Returns the bytes freed per path."""
    freed = {}
    for rel in ("data/raw", ".dvc/cache", "data/prepared/images.npy"):
        path = repo / rel
        if path.exists():
            freed[rel] = folder_bytes(path)
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    return freed


def file_count(root: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(root))
