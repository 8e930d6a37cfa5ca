"""ONNX Runtime sessions and batched prediction for the exported student; no torch import (see pipeline.predict)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipeline.lib.common import PipelineError, available_cores
from pipeline.lib.tta import apply_view

MANIFEST = "model.json"  # beside the .onnx files: everything needed to use them


def session(path: Path, threads: int | None = None):
    """A CPU inference session with `threads` intra-op threads (default: every core), graph optimisations on."""
    import onnxruntime as ort

    if not Path(path).is_file():
        raise PipelineError(f"{path} is missing: run `dvc repro export` first.")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or available_cores()
    opts.inter_op_num_threads = 1  # one graph at a time: every thread goes to the convolutions
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3  # errors only: not a warning per unused initializer
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def predict(sess, x: np.ndarray, views: list[str] = ("identity",), crop_scale: float = 0.875,
            batch_size: int = 64, progress=None) -> np.ndarray:
    """Parasitized probability per image of a normalised float32 (N, 3, H, W) batch, averaged over `views`."""
    name = sess.get_inputs()[0].name
    out = []
    for start in range(0, len(x), batch_size):
        b = x[start:start + batch_size]
        views_p = [sess.run(None, {name: np.ascontiguousarray(apply_view(b, v, crop_scale))})[0] for v in views]
        out.append(np.mean(views_p, 0))
        if progress is not None:
            progress.update(len(b))
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def load_manifest(folder: Path) -> dict:
    """The export's model.json, failing with the command that writes it."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise PipelineError(f"{path} is missing: run `dvc repro export` (or `dvc repro`) to export the student.")
    return json.loads(path.read_text())
