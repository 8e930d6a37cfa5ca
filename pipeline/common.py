"""Shared helpers: errors, logging setup, seeding and small path utilities."""
from __future__ import annotations

import logging
import random
import subprocess
import sys
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


class PipelineError(RuntimeError):
    """A problem with the user's input or setup; its message says what and how to fix it."""


def setup_logging(level: int = logging.INFO) -> None:
    """Configure logging once, for the stage's entry point (library code only logs)."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr, force=True)


def run_main(fn) -> None:
    """Run a stage's body: configure logging and turn PipelineError into one clear line and exit 1."""
    setup_logging()
    try:
        fn()
    except PipelineError as e:
        logging.getLogger("pipeline").error("%s", e)
        sys.exit(1)


def slide_group(img_name: str) -> str:
    """The slide/patient id of an NIH cell name (the part before `_IMG`); other names are their own group."""
    stem = Path(img_name).stem
    return stem.split("_IMG")[0] if "_IMG" in stem else stem


def labelled_test_seen(index) -> bool:
    """Whether labelled test images are also train rows of index.csv (data.train_on_test): their scores are then
    no held-out estimate. Read from the data, so every stage agrees without a flag passed around."""
    names, split = index["img_name"], index["split"]
    return bool(set(names[split == "test"]) & set(names[split == "train"]))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    import torch

    torch.manual_seed(seed)


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith("._")


def git_commit() -> str:
    """The short commit of the working tree, with -dirty when tracked files differ; unknown outside git."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True).stdout.strip()
        return sha.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
