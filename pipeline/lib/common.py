"""Shared helpers: errors, logging setup, seeding and small path utilities."""
from __future__ import annotations

import atexit
import errno
import gc
import json
import logging
import os
import random
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
# Set by pipeline.lib.distributed.relaunch: the folder where a failing torchrun worker writes its error, so the stage's
# one message names the rank and the error.
RANK_ERRORS_ENV = "PIPELINE_RANK_ERRORS"


class PipelineError(RuntimeError):
    """A problem with the user's input or setup; its message says what and how to fix it."""


# How a short write reads when it is not an OSError with an errno: numpy's tofile, and torch.save's zip writer (a
# C++ stream error, then "unexpected pos") wrapped in RuntimeError.
SHORT_WRITE = ("No space left", "File too large", "file write failed", "requested and", "iostream error",
               "unexpected pos")


def disk_full(e: BaseException) -> bool:
    """Whether `e` (or what caused it) is a full disk, a quota or a file-size limit: ENOSPC, EDQUOT, EFBIG, or a short
    write as numpy and torch.save report it."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            return True
        if isinstance(e, (OSError, RuntimeError)) and any(s in str(e) for s in SHORT_WRITE):
            return True
        e = e.__cause__ or e.__context__
    return False


# Written into a folder that written_whole replaces through a link (data/raw linked to a bigger disk): the link's
# target is replaced only while it is empty or holds this file, so a link to a user's own folder never loses its files.
OUTPUT_MARKER = ".written-by-pipeline"
# Called with each file written_whole completes (pipeline.lib.weights_only keeps a ledger of its checkpoints there).
AFTER_WRITE: list = []


def _linked_target(path: Path) -> Path:
    """The folder a link points to, if the pipeline may replace it: empty, or holding OUTPUT_MARKER."""
    target = path.resolve()
    if any(target.iterdir()) and not (target / OUTPUT_MARKER).is_file():
        raise PipelineError(f"{path} is a link to {target}, which holds files this pipeline did not write; the "
                            "pipeline replaces what it writes there, so it writes through a link only into an empty "
                            f"folder or one it wrote. Point {path} at an empty folder, or remove the link.")
    return target


@contextmanager
def written_whole(path: Path, needed_bytes: int | None = None):
    """Yield a temporary path beside `path` (a file or a folder) to write into; on success it replaces `path`, so a
    later run never trusts a half-written one. On any failure the temporary is removed and `path` is left as it was;
    a full disk is one PipelineError naming the path and about how much space it needs. A folder reached through a
    link is replaced only while it is empty or written by the pipeline (OUTPUT_MARKER)."""
    path = Path(path)
    linked = path.is_symlink() and path.is_dir()
    if linked:  # a folder linked to a bigger disk: write there, keep the link
        path = _linked_target(path)
    tmp = path.with_name(f".{path.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
    try:
        yield tmp
        if linked and tmp.is_dir():
            (tmp / OUTPUT_MARKER).write_text("Written by the malaria pipeline; it replaces this folder's files.\n")
        if path.is_dir() and tmp.is_dir():  # a folder cannot be renamed over another: move the old one aside first
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            path.replace(old)
            tmp.replace(path)
            shutil.rmtree(old)
        else:
            tmp.replace(path)
        for hook in AFTER_WRITE:
            hook(path)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        if not disk_full(e):
            raise
        free = shutil.disk_usage(path.parent if path.parent.exists() else ".").free
        need = f"about {needed_bytes / 2**20:,.1f} MB" if needed_bytes else "more space"
        raise PipelineError(f"The disk is full (or a file-size limit was hit) writing {path}: it needs {need}, "
                            f"{free / 2**20:,.0f} MB are free. Free some space (DVC's cache of older runs: "
                            "`dvc gc -w`) and run again; the last complete files are kept."
                            ) from None


def move_aside(path: Path, reason: str, keep: int = 2) -> Path:
    """Rename `path` into set-aside/ beside it, stamped with the time and its reason in a .why.txt next to it; only the
    newest `keep` set-asides of each name stay, so they never pile up. Returns the new path."""
    folder = path.parent / "set-aside"
    folder.mkdir(exist_ok=True)
    (folder / ".gitignore").write_text("*\n")  # set-asides beside DVC's outputs are never committed
    while True:  # the time to the microsecond, which sorts as it was written; two in one microsecond wait
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        if not (new := folder / f"{path.stem}.{stamp}{path.suffix}").exists():
            break
        time.sleep(1e-6)
    path.replace(new)
    new.with_name(f"{new.stem}.why.txt").write_text(f"{path} was set aside at {stamp}: {reason}\n")
    for old in sorted(folder.glob(f"{path.stem}.*Z{path.suffix}"))[:-keep]:
        old.unlink()
        old.with_name(f"{old.stem}.why.txt").unlink(missing_ok=True)
    return new


def path_overlap(path: Path, other: Path) -> str | None:
    """How `path` lies against `other` once links are followed: "the same folder as", "inside" or "a folder above";
    None when neither holds the other (or either cannot be resolved)."""
    try:
        a, b = Path(path).resolve(), Path(other).resolve()
    except (OSError, RuntimeError):  # a symlink loop (RuntimeError on Python 3.11)
        return None
    if a == b:
        return "the same folder as"
    return "inside" if a.is_relative_to(b) else "a folder above" if b.is_relative_to(a) else None


def write_text_whole(path: Path, text: str) -> None:
    """path.write_text, whole or not at all (written_whole)."""
    with written_whole(Path(path), len(text.encode())) as tmp:
        tmp.write_text(text, encoding="utf-8")


def setup_logging(level: int = logging.INFO) -> None:
    """Configure logging once, for the stage's entry point (library code only logs); under torchrun each line names
    its rank, and ranks other than 0 log warnings and errors only (rank 0 speaks for all)."""
    rank = os.environ.get("RANK") if "LOCAL_RANK" in os.environ else None
    if rank not in (None, "0"):
        level = max(level, logging.WARNING)
    logging.basicConfig(level=level, format="%(asctime)s " + (f"rank{rank} " if rank else "") +
                        "%(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", stream=sys.stderr, force=True)


def _report_rank_error(message: str) -> None:
    """Under pipeline.lib.distributed.relaunch, leave this rank's error where the launching stage reads it."""
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
    # Python's last garbage collections walk every object torch, timm and scikit-learn imported, a second or more at
    # each torch stage's exit (docs/results.md, "Demo speed-ups"). Frozen at exit, after the stage's own work.
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


def available_cores() -> int:
    """Cores this process may run on: its CPU affinity (taskset, containers, a lab node's share), not the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


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


def batch_split_problem(batch_size: int, processes: int) -> str:
    """Why train.batch_size, the global batch, cannot be split over `processes` DDP processes; empty when it can: each
    process takes batch_size // processes images a step, so it must divide evenly, into at least 2 (BatchNorm)."""
    if batch_size // processes < 2:
        return (f"train.batch_size {batch_size} (the global batch) over {processes} processes (train.gpus) leaves "
                f"fewer than 2 images per process, and BatchNorm needs 2: set train.batch_size to at least "
                f"{2 * processes}")
    if batch_size % processes:
        low = batch_size // processes * processes
        return (f"train.batch_size {batch_size} (the global batch) does not split evenly over {processes} processes "
                f"(train.gpus): set it to a multiple of {processes}, e.g. {low} or {low + processes}, or train.gpus "
                "to a count that divides it")
    return ""
