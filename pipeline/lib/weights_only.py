"""Reading torch files weights only (tensors and plain types): a checkpoint or weights file that would run code is refused."""
from __future__ import annotations

import hashlib
import logging
import os
import pickle
import re
from pathlib import Path

import torch

from pipeline.lib.common import AFTER_WRITE, PipelineError

log = logging.getLogger(__name__)

# Set to 1 to load checkpoints and weights files that need more than tensors and plain types (full unpickling, which
# runs whatever code the file names). Off by default; an environment variable, never a param, so no run records it.
TRUST_ENV = "PIPELINE_TRUST_CHECKPOINTS"
# torch's weights-only loader can be made to run code by a crafted file before 2.6 (CVE-2025-32434) and to corrupt
# memory before 2.10 (CVE-2026-24747, GHSA-63cw-57p8-fm3p); requirements.txt asks for 2.10. An older torch already
# installed (a Kaggle or Colab image's) loads only the files this pipeline wrote on this machine (a ledger of their
# sha256), and refuses every other with one message.
SAFE_TORCH = "2.10"
LEDGER_SIZE = 5000  # files remembered (a checkpoint per fold and epoch kept, many runs)
CHECKPOINT_SUFFIXES = (".pt", ".pth")


class UntrustedCheckpoint(PipelineError):
    """A checkpoint or weights file that weights-only loading refused: unpickling it could run code."""

    def __init__(self, path: str | Path, reason: str):
        self.path, self.reason = Path(path), reason
        self.summary = f"it is not weights only: {reason}"  # why, in a resume or reuse decision's log line
        super().__init__(
            f"{path} was not loaded: {reason}. Every file this pipeline writes holds only tensors and plain types "
            f"(loaded weights only). If you trust its author, set {TRUST_ENV}=1 and re-run; "
            "otherwise delete it (`dvc repro` writes the pipeline's own again; pretrained weights are safest as "
            ".safetensors).")


class ForeignCheckpoint(UntrustedCheckpoint):
    """A file this pipeline did not write on this machine, refused because the installed torch is older than
    SAFE_TORCH (its weights-only loader can be made to run code)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.reason = self.summary = (
            f"it was not written by this pipeline on this machine, and torch {torch.__version__} (older than "
            f"{SAFE_TORCH}) can be made to run code or corrupt memory by a crafted file even loading weights only "
            "(CVE-2025-32434, CVE-2026-24747)")
        PipelineError.__init__(self, f"{path} was not loaded: {self.reason}. Install torch {SAFE_TORCH} or newer "
                               f"(`pip install -r requirements.txt`); or, if you trust its author, set {TRUST_ENV}=1 "
                               "and re-run.")


def trusting_checkpoints() -> bool:
    return os.environ.get(TRUST_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def torch_is_safe() -> bool:
    return torch.__version__ >= SAFE_TORCH  # TorchVersion compares as a version, "2.9.1" < "2.10"


def ledger() -> Path:
    """Where an older torch records the sha256 of every checkpoint this pipeline writes (outside the project)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "malaria-pipeline" / "own-checkpoints"


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def remember_written(path: Path) -> None:
    """Record a checkpoint the pipeline just wrote (written_whole calls this), while torch is older than SAFE_TORCH."""
    if torch_is_safe() or Path(path).suffix not in CHECKPOINT_SUFFIXES:
        return
    file = ledger()
    file.parent.mkdir(parents=True, exist_ok=True)
    lines = file.read_text().split() if file.is_file() else []
    file.write_text("\n".join([*lines[-(LEDGER_SIZE - 1):], _sha256(path)]) + "\n")


AFTER_WRITE.append(remember_written)


def refuse_foreign(path: str | Path) -> None:
    """With a torch older than SAFE_TORCH, refuse a file this pipeline did not write on this machine."""
    if torch_is_safe() or trusting_checkpoints():
        return
    file = ledger()
    if file.is_file() and _sha256(Path(path)) in set(file.read_text().split()):
        return
    raise ForeignCheckpoint(path)


def read_checkpoint(path: str | Path, *, mmap: bool = False):
    """torch.load of `path` onto the CPU, weights only (tensors and plain types). A file that needs anything else raises
    UntrustedCheckpoint, unless PIPELINE_TRUST_CHECKPOINTS=1 allows loading it in full; bytes that are no pickle
    torch.save writes (a truncated or damaged file) raise a PipelineError saying so. With a torch older than SAFE_TORCH,
    only files this pipeline wrote on this machine are read (refuse_foreign)."""
    if not Path(path).is_file():
        raise PipelineError(f"{path} is missing: run the stage that makes it (`dvc repro`).")
    refuse_foreign(path)
    try:
        return _load(path, True, mmap)
    except pickle.UnpicklingError as e:
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))  # torch's message is a page long, with terminal colours
    found = re.search(r"WeightsUnpickler error: *\n*(.+)", text)
    detail = (found.group(1) if found else text.splitlines()[0] if text else "").strip()
    if trusting_checkpoints():
        log.warning("%s is not weights only (%s); loading it in full, as %s=1 says you trust its author", path,
                    detail, TRUST_ENV)
        return _load(path, False, mmap)
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


def _load(path: str | Path, weights_only: bool, mmap: bool):
    """torch.load onto the CPU; a file torch cannot read as a whole (truncated, damaged) is one PipelineError."""
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=mmap)
    except pickle.UnpicklingError:
        raise
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError) as e:
        # torch's reader: "failed finding central directory" (cut short), "Ran out of input" (empty) and the like
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PipelineError(f"{path} cannot be read: it is truncated or damaged (torch: {first}). Delete it; "
                            "`dvc repro` writes the pipeline's own again.") from None
