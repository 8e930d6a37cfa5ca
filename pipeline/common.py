"""Shared helpers: errors, logging setup, seeding and small path utilities."""
from __future__ import annotations

import atexit
import gc
import json
import logging
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
# Set by pipeline.distributed.relaunch: the folder where a failing torchrun worker writes its error, so the stage's
# one message names the rank and the error.
RANK_ERRORS_ENV = "PIPELINE_RANK_ERRORS"


class PipelineError(RuntimeError):
    """A problem with the user's input or setup; its message says what and how to fix it."""


def setup_logging(level: int = logging.INFO) -> None:
    """Configure logging once, for the stage's entry point (library code only logs); under torchrun each line names
    its rank, and ranks other than 0 log warnings and errors only (rank 0 speaks for all)."""
    rank = os.environ.get("RANK") if "LOCAL_RANK" in os.environ else None
    if rank not in (None, "0"):
        level = max(level, logging.WARNING)
    logging.basicConfig(level=level, format="%(asctime)s " + (f"rank{rank} " if rank else "") +
                        "%(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", stream=sys.stderr, force=True)


def _report_rank_error(message: str) -> None:
    """Under pipeline.distributed.relaunch, leave this rank's error where the launching stage reads it."""
    folder = os.environ.get(RANK_ERRORS_ENV)
    if folder and "RANK" in os.environ:
        Path(folder, f"rank{os.environ['RANK']}.txt").write_text(message)


def _pop_timing_option() -> Path | None:
    """Take `--timing FILE` (every stage's command in dvc.yaml has it) out of sys.argv, before the stage parses it."""
    if "--timing" not in sys.argv[:-1]:
        return None
    i = sys.argv.index("--timing")
    path = sys.argv[i + 1]
    del sys.argv[i:i + 2]
    return Path(path)


def stage_timing(path: Path, seconds: float) -> None:
    """The stage's wall time, for the log and the report stage's summary (data/timing.json, a DVC metric)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"seconds": round(seconds, 1), "minutes": round(seconds / 60, 3)}, indent=2))


def run_main(fn) -> None:
    """Run a stage's body: configure logging and turn PipelineError into one clear line and exit 1; with `--timing
    FILE`, log the stage's wall time and write it there."""
    setup_logging()
    # Python's last garbage collections walk every object torch, timm and scikit-learn imported: 1.3-1.5 s of each
    # torch stage's exit (0.24 s frozen), seconds of every `dvc repro`. Frozen at exit, after the stage's own work.
    atexit.register(gc.freeze)
    timing, start = _pop_timing_option(), time.perf_counter()
    try:
        fn()
    except PipelineError as e:
        _report_rank_error(str(e))
        logging.getLogger("pipeline").error("%s", e)
        sys.exit(1)
    except Exception as e:
        _report_rank_error(f"{type(e).__name__}: {e}")
        raise
    if timing is not None:
        seconds = time.perf_counter() - start
        logging.getLogger("pipeline").info("%s took %.1f s", Path(sys.argv[0]).stem, seconds)
        stage_timing(timing, seconds)


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
