"""Reading torch files weights only (tensors and plain types): a checkpoint or weights file that would run code is refused."""
from __future__ import annotations

import logging
import os
import pickle
import re
from pathlib import Path

import torch

from pipeline.common import PipelineError

log = logging.getLogger(__name__)

# Set to 1 to load checkpoints and weights files that need more than tensors and plain types (full unpickling, which
# runs whatever code the file names). Off by default; an environment variable, never a param, so no run records it.
TRUST_ENV = "PIPELINE_TRUST_CHECKPOINTS"


class UntrustedCheckpoint(PipelineError):
    """A checkpoint or weights file that weights-only loading refused: unpickling it could run code."""

    def __init__(self, path: str | Path, reason: str):
        self.path, self.reason = Path(path), reason
        super().__init__(
            f"{path} was not loaded: {reason}. Every file this pipeline writes holds only tensors and plain types "
            f"(loaded weights only). If you trust its author, set {TRUST_ENV}=1 and re-run; "
            "otherwise delete it (`dvc repro` writes the pipeline's own again; pretrained weights are safest as "
            ".safetensors).")


def trusting_checkpoints() -> bool:
    return os.environ.get(TRUST_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def read_checkpoint(path: str | Path, *, mmap: bool = False):
    """torch.load of `path` onto the CPU, weights only (tensors and plain types). A file that needs anything else raises
    UntrustedCheckpoint, unless PIPELINE_TRUST_CHECKPOINTS=1 allows loading it in full; bytes that are no pickle
    torch.save writes raise a PipelineError saying so."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))  # torch's message is a page long, with terminal colours
    found = re.search(r"WeightsUnpickler error: *\n*(.+)", text)
    detail = (found.group(1) if found else text.splitlines()[0] if text else "").strip()
    if trusting_checkpoints():
        log.warning("%s is not weights only (%s); loading it in full, as %s=1 says you trust its author", path,
                    detail, TRUST_ENV)
        return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    if detail.startswith("Unsupported operand"):  # garbage, not a refused global
        raise PipelineError(f"{path} cannot be read: it is damaged or not a file torch.save wrote (torch: {detail}). "
                            "Delete it; `dvc repro` writes the pipeline's own again.") from None
    # Which globals the file names, read from its opcodes without running them (torch >= 2.5, zip files).
    try:
        names = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # older torch, or the legacy format: the first global torch refused
        names = re.findall(r"^Unsupported global: GLOBAL (\S+)", detail)
    raise UntrustedCheckpoint(path, f"it needs unpickling of {', '.join(names)}, which can run any code" if names
                              else f"torch's weights-only loader refused it ({detail})")
