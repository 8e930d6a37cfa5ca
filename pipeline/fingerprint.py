"""Resume fingerprints: everything that decides a model's weights, so a last.pt is resumed only when all of it is unchanged."""
from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Any, Iterable


# The params that shape what a model learns, as sections or dotted keys of params.yaml. The data's source
# and path are not here on purpose: the content of the prepared cache and the folds is hashed instead, so
# the same cells from another path resume, and other cells never do.
TEACHER_PARAMS = ("data.img_size", "folds", "train", "augment")
STUDENT_PARAMS = (*TEACHER_PARAMS, "distill")
# Keys inside those sections that change only inference, speed or bookkeeping: changing them re-predicts
# from the finished checkpoint instead of retraining (every other key retrains). train.refit adds a model beside
# the folds without changing them; the refit model's own fingerprint holds what it depends on (its epochs).
# train.gpus and train.sync_bn split a run over processes without changing its recipe (train.batch_size is the global
# batch): what the run did with them (TrainConfig.world_size and .sync_bn) is recorded as resume-only (see make).
INFERENCE_ONLY = frozenset({"train.backbones", "train.device", "train.num_workers", "train.weights_dir",
                            "train.refit", "train.gpus", "train.sync_bn", "train.compile",
                            "distill.timing_images"})
# The code that decides what a model learns: an edit to any of these (or other torch/timm versions) retrains.
TRAINING_CODE = ("engine.py", "losses.py", "batch_aug.py", "transforms.py", "dataset.py", "precision.py", "models.py")


def code_digest() -> str:
    """sha256 over the training code and the torch/timm versions."""
    import timm
    import torch

    h = hashlib.sha256(f"torch {torch.__version__} timm {timm.__version__}".encode())
    for name in TRAINING_CODE:
        h.update((Path(__file__).parent / name).read_bytes())
    return h.hexdigest()


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


def make(params: dict[str, Any], inputs: dict[str, str], resume_only: dict[str, Any] | None = None) -> dict:
    """A fingerprint: flat learned params and the digests of the data inputs, by name; `resume_only`, how the run was
    split over processes, which only a half-trained run must match to resume (see resume_only_differences)."""
    out = {"params": dict(params), "inputs": dict(inputs)}
    return {**out, "resume_only": dict(resume_only)} if resume_only else out


def differences(old: dict | None, new: dict) -> list[str]:
    """What changed from `old` to `new`, one phrase each; empty when a run may resume (a half-trained one also needs
    the same split over processes: resume_only_differences)."""
    if not old:
        return ["it has no fingerprint (written before resume checks existed)"]
    out = []
    for kind in ("params", "inputs"):
        a, b = old.get(kind, {}), new.get(kind, {})
        for k in sorted(set(a) | set(b)):
            if a.get(k, "<unset>") != b.get(k, "<unset>"):
                out.append(f"{k}: {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}" if kind == "params"
                           else f"{k} content changed")
    return out


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
