"""The pipeline's checkpoints and resuming: what a model's weights depend on (its fingerprint), saving and loading
self-describing checkpoints, and whether a run resumes, reuses or sets aside the files it finds."""
from __future__ import annotations

import ast
import functools
import hashlib
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterable

import timm
import torch

from pipeline.lib.common import PipelineError, move_aside, written_whole
from pipeline.lib.models import create_model, data_config, local_weights
from pipeline.lib.weights_only import UntrustedCheckpoint, read_checkpoint

log = logging.getLogger(__name__)


# The params that shape what a model learns, as sections or dotted keys of params.yaml. The data's source
# and path are not here on purpose: the content of the prepared cache and the folds is hashed instead, so
# the same cells from another path resume, and other cells never do.
TEACHER_PARAMS = ("data.img_size", "folds", "train", "augment")
STUDENT_PARAMS = (*TEACHER_PARAMS, "distill")
# Keys inside those sections that change only inference, speed or bookkeeping: changing them re-predicts
# from the finished checkpoint instead of retraining (every other key retrains). train.refit adds a model beside
# the folds without changing them; the refit model's own fingerprint holds what it depends on (its epochs).
# train.gpus and train.sync_bn split a run over processes without changing its recipe (train.batch_size is the global
# batch): what the run did with them (TrainConfig.world_size and .sync_bn) is recorded as resume-only (see fingerprint).
INFERENCE_ONLY = frozenset({"train.backbones", "train.device", "train.num_workers", "train.weights_dir",
                            "train.refit", "train.gpus", "train.sync_bn", "train.compile",
                            "distill.timing_images"})
# The code that decides what a model learns: an edit to any of these retrains. Hashed as code (see code_digest), so
# moving a module or editing its comments, docstrings or imports does not.
TRAINING_CODE = ("engine.py", "losses.py", "batch_aug.py", "transforms.py", "dataset.py", "precision.py", "models.py",
                 "images.py")
# Library builds a model was trained with: recorded and logged when they differ, never a reason to retrain (a model
# trained in a Kaggle notebook's +cu12x torch is reused by a laptop's +cpu build).
BUILDS = ("torch", "timm", "numpy", "PIL")
# Each cached image's channel means (0-255, rounded) may move this much between decoder builds and still be the
# same picture of the same cell (resampling rounds differently; another picture moves them by more).
PIXEL_TOLERANCE = 1


def _code_only(source: str) -> str:
    """A module as code alone: its syntax tree without docstrings and import statements."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list):
            body[:] = [n for n in body if not isinstance(n, (ast.Import, ast.ImportFrom)) and not (
                isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) and isinstance(n.value.value, str))]
    return ast.dump(tree, annotate_fields=False)


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """sha256 over the training code as code (comments, docstrings and imports aside), in no particular order."""
    parts = sorted(hashlib.sha256(_code_only((Path(__file__).parent / name).read_text()).encode()).hexdigest()
                   for name in TRAINING_CODE)
    return hashlib.sha256("".join(parts).encode()).hexdigest()


def builds() -> dict[str, str]:
    """The versions of the libraries whose builds may change a model's bytes but not what it learned."""
    import importlib

    return {name: str(getattr(importlib.import_module(name), "__version__", "?")) for name in BUILDS}


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes (the prepared cache, the folds CSV, a weights file); a stage training several folds
    hashes the same cache once, a file rewritten in between (new size or mtime) again."""
    stat = Path(path).stat()
    return _file_digest(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=32)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _flatten(node: Any, prefix: str) -> dict[str, Any]:
    if isinstance(node, dict):
        return {k: v for key, sub in node.items() for k, v in _flatten(sub, f"{prefix}.{key}").items()}
    return {prefix: list(node) if isinstance(node, tuple) else node}


def learned_params(params: dict, keys: Iterable[str] = TEACHER_PARAMS) -> dict[str, Any]:
    """The flat `section.key -> value` map of the params that shape training, inference-only keys left out."""
    out = {}
    for key in keys:
        node = params
        for part in key.split("."):
            node = node.get(part, {}) if isinstance(node, dict) else {}
        out.update(_flatten(node, key))
    return {k: v for k, v in sorted(out.items()) if k not in INFERENCE_ONLY}


def fingerprint(params: dict[str, Any], inputs: dict[str, str], resume_only: dict[str, Any] | None = None,
                measured: dict[str, Any] | None = None) -> dict:
    """A fingerprint: flat learned params and the digests of the data inputs, by name; `resume_only`, how the run was
    split over processes, which only a half-trained run must match to resume (see resume_only_differences);
    `measured`, the cached images' channel means (equal within PIXEL_TOLERANCE) and the library builds (logged)."""
    out = {"params": dict(params), "inputs": dict(inputs)}
    if measured:
        out["measured"] = dict(measured)
    return {**out, "resume_only": dict(resume_only)} if resume_only else out


def model_fingerprint(params: dict[str, Any], prepared: Path, weights: str, folds_csv: Path | None = None) -> dict:
    """The fingerprint of a model trained on the prepared cells (and the folds, for a fold model) from `weights`
    (weights_digest) with these flat params."""
    return fingerprint(params, {**data_digests(prepared, folds_csv), "weights": weights},
                       measured={"pixels": pixel_means(prepared), "builds": builds()})


def differences(old: dict | None, new: dict) -> list[str]:
    """What changed from `old` to `new`, one phrase each; empty when a run may resume (a half-trained one also needs
    the same split over processes: resume_only_differences). Other library builds are no difference."""
    if not old:
        return ["it has no fingerprint (written before resume checks existed)"]
    out = []
    for kind in ("params", "inputs"):
        a, b = old.get(kind, {}), new.get(kind, {})
        for k in sorted(set(a) | set(b)):
            if a.get(k, "<unset>") != b.get(k, "<unset>"):
                out.append(f"{k}: {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}" if kind == "params"
                           else f"{k} content changed")
    if _pixels_differ((old.get("measured") or {}).get("pixels"), (new.get("measured") or {}).get("pixels")):
        out.append("the cached pixels changed (an image's channel means moved by more than decoder builds do)")
    return out


def build_differences(old: dict | None, new: dict) -> list[str]:
    """The libraries whose builds differ between two fingerprints, as `torch 2.11.0+cu128 -> 2.14.1+cpu`."""
    a, b = ((f or {}).get("measured", {}).get("builds", {}) for f in (old, new))
    return [f"{k} {a.get(k, '?')} -> {b.get(k, '?')}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def resume_only_differences(old: dict | None, new: dict) -> list[str]:
    """What differs in how the runs were split over processes, one phrase each: a half-trained run resumes only with
    the same split (its steps, shuffles and random draws are per process), a finished one is reused with any."""
    a, b = (old or {}).get("resume_only"), new.get("resume_only", {})
    if a is None:
        return ["it does not record the process count it was trained with"]
    processes = lambda n: f"{n} process" + ("" if n == 1 else "es")
    out = []
    if a.get("config.world_size") != b.get("config.world_size"):
        out.append(f"it was trained with {processes(a.get('config.world_size'))} and this run has "
                   f"{b.get('config.world_size')} (a half-trained run resumes only at the same process count)")
    for k in sorted((set(a) | set(b)) - {"config.world_size"}):
        if a.get(k) != b.get(k):
            out.append(f"it was trained with train.{k.removeprefix('config.')} {a.get(k)!r} and this run has "
                       f"{b.get(k)!r} (a half-trained run resumes only with the same)")
    return out


def data_digests(prepared: Path, folds_csv: Path | None = None) -> dict[str, str]:
    """What a model learns from, as digests: the cells (names, splits, labels and the digests of their decoded
    pixels, from the prepare stage's index.csv), the folds (for fold models), and the training code."""
    out = {"cells": _table_digest(prepared / "index.csv", ("split", "img_name", "label", "hash"))}
    if folds_csv is not None:
        out["folds"] = _table_digest(folds_csv, ("img_name", "fold"))
    return {**out, "training code": code_digest()}


def _table_digest(path: Path, columns: tuple[str, ...]) -> str:
    """sha256 of some columns of a CSV, as text: the same cells from another build of pandas or numpy hash alike."""
    if not Path(path).is_file():
        raise PipelineError(f"{path} is missing: run `dvc repro` (it makes it).")
    stat = Path(path).stat()
    return _table_digest_cached(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns, columns)


@functools.lru_cache(maxsize=8)
def _table_digest_cached(path: str, size: int, mtime_ns: int, columns: tuple[str, ...]) -> str:
    import pandas as pd

    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in columns if c not in table]
    if missing:
        raise PipelineError(f"{path} has no column {', '.join(missing)}: re-run `dvc repro` to rewrite it.")
    return hashlib.sha256(table[list(columns)].to_csv(index=False).encode()).hexdigest()


def pixel_means(prepared: Path) -> str:
    """Each cached image's per-channel means (0-255, rounded), base64: decoder builds move them by rounding, another
    picture of a cell by more."""
    path = prepared / "images.npy"
    stat = path.stat()
    return _pixel_means(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _pixel_means(path: str, size: int, mtime_ns: int) -> str:
    import base64

    import numpy as np

    images = np.load(path, mmap_mode="r")
    means = [images[s:s + 1024].mean(axis=(1, 2)) for s in range(0, len(images), 1024)]  # chunks: a cache is GBs
    flat = np.concatenate(means) if means else np.zeros((0, 3))
    return base64.b64encode(np.rint(flat).astype(np.uint8).tobytes()).decode()


def _pixels_differ(a: str | None, b: str | None) -> bool:
    """Whether two pixel_means differ by more than PIXEL_TOLERANCE in any image and channel (or in length)."""
    if a is None or b is None:
        return a != b
    import base64

    import numpy as np

    x, y = (np.frombuffer(base64.b64decode(v), np.uint8).astype(int) for v in (a, b))
    return len(x) != len(y) or bool(len(x) and np.abs(x - y).max() > PIXEL_TOLERANCE)


def weights_digest(arch: str, pretrained: bool, weights_dir: str | Path | None) -> str:
    """What the starting weights are, for resume fingerprints: none, a local file's sha256, or the hub's tag."""
    if not pretrained:
        return "none (from scratch)"
    file = local_weights(arch, weights_dir)
    if file is not None:
        return f"{file.name}:{file_digest(file)}"
    cfg = timm.models.get_pretrained_cfg(arch)
    return f"hub:{cfg.hf_hub_id if cfg is not None and cfg.hf_hub_id else arch}"


# TrainConfig fields that change speed, not the weights: a run may resume with other values.
_SPEED_ONLY = ("num_workers", "device", "compile")
# Fields that split a run over processes without changing its recipe (batch_size is the global batch): a finished
# model is reused whatever they are; a half-trained last.pt resumes only with the same (resume_only_differences).
_RESUME_ONLY = ("world_size", "sync_bn")


def run_fingerprint(cfg, base: dict | None) -> dict:
    """The caller's fingerprint (params and data digests) plus the fields of `cfg` (engine.TrainConfig) that shape
    training, and the process split as resume-only."""
    base = base or fingerprint({}, {})
    config = asdict(cfg)
    shaping = {f"config.{k}": v for k, v in config.items() if k not in (*_SPEED_ONLY, *_RESUME_ONLY)}
    return fingerprint({**base["params"], **shaping}, base["inputs"], {f"config.{k}": config[k] for k in _RESUME_ONLY},
                       base.get("measured"))


def set_aside(last: Path, reasons: list[str]) -> None:
    """Move a last.pt that does not belong to this run, and the checkpoint.pt beside it that retraining would overwrite,
    into set-aside/ with their reason (common.move_aside: the newest two of each kept), saying why: the one log line
    of every such decision."""
    reason = "; ".join(reasons)
    moved = [move_aside(p, reason) for p in (last, last.with_name("checkpoint.pt")) if p.is_file()]
    log.warning("Setting aside %s and training from scratch, because %s (moved to %s; the newest two set-asides of "
                "each file are kept)", last, reason, ", ".join(map(str, moved)) or "nowhere: it was gone")


def resume_state(last: Path, current: dict) -> dict | None:
    """The contents of `last` if it was trained on exactly `current`'s inputs; otherwise it is set aside (moved)."""
    if not last.is_file():
        orphan = last.with_name("checkpoint.pt")
        if orphan.is_file():  # no last.pt says which run it is from, and training from scratch would overwrite it
            new = move_aside(orphan, f"no {last.name} beside it said which run it belonged to; trained afresh")
            log.warning("Moving %s aside to %s: no %s says which run it is from, and training from scratch writes a "
                        "new one", orphan, new, last.name)
        return None
    try:
        ck = read_checkpoint(last)
        diff = differences(ck.get("fingerprint"), current)
        if not diff and not ck["state"]["done"]:  # a half-trained run resumes only with the same process split
            diff = resume_only_differences(ck.get("fingerprint"), current)
    except UntrustedCheckpoint as e:  # someone else's file, which could run code: never loaded
        ck, diff = None, [e.summary]
    except Exception as e:  # a truncated or foreign file must not stop a fresh run
        ck, diff = None, [f"it cannot be read ({type(e).__name__}: {e})"]
    if not diff:
        if other := build_differences(ck.get("fingerprint"), current):
            log.info("%s was written by other library builds (%s); the same params, cells and code, so it is used",
                     last, ", ".join(other))
        return ck
    set_aside(last, diff)
    return None


def kept_differences(ckpt: Path, last: Path, base: dict, run: dict) -> list[str]:
    """What differs between the kept checkpoint's inputs and this run's (`base`), or between it and the epoch last.pt
    says was kept (a kill between writing the two), or, for a half-trained last.pt, between its process split and
    this run's (`run`, run_fingerprint); empty when both belong to this run."""
    if not ckpt.is_file():
        return [f"{ckpt} is missing"]
    path = ckpt  # the file being read, for the reason
    try:
        kept = read_checkpoint(ckpt)
        path = last
        resumable = read_checkpoint(last)
        state = resumable.get("state", {})
    except UntrustedCheckpoint as e:  # someone else's file, which could run code: never loaded
        return [f"{path}: {e.summary}"]
    except Exception as e:  # a truncated or foreign file: it does not belong to this run
        return [f"{path} cannot be read ({type(e).__name__}: {e})"]
    if kept.get("epoch") != state.get("best_epoch"):
        return [f"{ckpt} holds epoch {kept.get('epoch')} but {last} kept epoch {state.get('best_epoch')}"]
    # A finished model is reused at any process count; a half-trained one resumes only at its own.
    return differences(kept.get("fingerprint"), base) or (
        [] if state.get("done") else resume_only_differences(resumable.get("fingerprint"), run))


def save_checkpoint(path: Path, model: torch.nn.Module, *, arch: str, params: dict, epoch: int,
                    metric: dict, extra: dict | None = None) -> None:
    """A self-describing checkpoint: everything inference needs to rebuild the model, with the precision it trained in
    (engine.fit sets `trained_precision` on the model; predictions run in it where the device has it natively)."""
    state = model.state_dict()
    with written_whole(Path(path), sum(t.numel() * t.element_size() for t in state.values())) as tmp:
        torch.save({"arch": arch, "params": params, "epoch": epoch, "metric": metric, "data_config": data_config(model),
                    "precision": getattr(model, "trained_precision", "fp32"), "state_dict": state, **(extra or {})}, tmp)


def load_checkpoint(path: Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """Rebuild a model from a checkpoint written by save_checkpoint; returns (model in eval mode, channels_last as the
    pipeline feeds it, with `trained_precision` from the checkpoint; the checkpoint)."""
    if not Path(path).is_file():
        raise PipelineError(f"Checkpoint {path} is missing: run the stage that makes it (`dvc repro`).")
    ckpt = read_checkpoint(path)
    if not isinstance(ckpt, dict) or not {"arch", "state_dict"} <= set(ckpt):
        raise PipelineError(f"{path} is not a checkpoint this pipeline wrote (no arch and state_dict); delete it and "
                            "run `dvc repro`.")
    model = create_model(ckpt["arch"], pretrained=False)
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:  # another timm names or shapes this architecture's layers differently
        trained = ((ckpt.get("fingerprint") or {}).get("measured") or {}).get("builds", {}).get("timm")
        detail = " ".join(str(e).split())[:300]
        raise PipelineError(
            f"{path}: timm {timm.__version__} cannot load this {ckpt['arch']}'s weights (trained with timm "
            f"{trained or 'of another version'}): {detail}. Install the timm it was trained with"
            f"{f' (`pip install timm=={trained}`)' if trained else ''}, or retrain it (move the file aside and run "
            "`dvc repro`).") from None
    model.trained_precision = ckpt.get("precision", "fp32")  # older checkpoints: predicted in fp32
    return model.to(device).to(memory_format=torch.channels_last).eval(), ckpt
