"""Data-parallel training (DDP): the stage re-launches itself under torchrun, one process per GPU (gloo on the CPU)."""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import tempfile
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from pipeline.lib.cards import require_usable_cards
from pipeline.lib.common import RANK_ERRORS_ENV, PipelineError, batch_split_problem

log = logging.getLogger(__name__)

# A collective that waits this long (a rank hung, not crashed) fails the stage instead of hanging it for ever; a
# rank that crashes is caught sooner, by torchrun, which then stops the others.
TIMEOUT = timedelta(minutes=int(os.environ.get("PIPELINE_DDP_TIMEOUT_MIN", "30")))


def launched() -> bool:
    """Whether this process is one of torchrun's workers (it sets WORLD_SIZE, RANK, LOCAL_RANK)."""
    return "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def processes_wanted(gpus: str | int, device: str) -> int:
    """Processes that `train.gpus` asks for on `train.device`: auto = one per visible GPU, one on the CPU. On CUDA,
    first two tiny ops on every visible card (pipeline.lib.cards): a card this torch cannot run stops here, with the fix,
    before any training (a P100 under a CUDA 12.8+ build would fail at the first op of each process)."""
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if cuda:
        require_usable_cards()
    visible = torch.cuda.device_count() if cuda else 0
    mps = device == "mps" or (device == "auto" and not cuda and torch.backends.mps.is_available())
    if mps and gpus != "auto" and gpus > 1:
        raise PipelineError(f"train.gpus is {gpus}, but Apple's GPU (mps) is one device and DDP does not run on it; "
                            "set train.gpus to auto or 1.")
    if gpus == "auto":
        return max(1, visible)
    if cuda and gpus > visible:
        raise PipelineError(f"train.gpus is {gpus} but {visible} CUDA GPU(s) are visible; set train.gpus to auto or "
                            f"at most {visible}.")
    return int(gpus)


def relaunch(module: str, args: list[str], nproc: int) -> None:
    """Run `python -m module args` as `nproc` torchrun workers on this machine; a failed rank fails it with its error.

    torchrun stops the other workers as soon as one exits with an error, so a crash never leaves the stage hanging."""
    with tempfile.TemporaryDirectory(prefix="ddp-errors-") as errors:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "--max-restarts=0", "--monitor-interval=0.5", "-m", module, *args]
        log.info("Launching %d processes (DDP): %s", nproc, " ".join(cmd[1:]))
        proc = subprocess.Popen(cmd, env={**os.environ, RANK_ERRORS_ENV: errors}, preexec_fn=_die_with_parent)
        # A SIGTERM to this process (DVC, a scheduler, `timeout`) must stop torchrun too, not orphan it.
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            code = proc.wait()
        except BaseException:  # Ctrl-C, or DVC stopping the stage: torchrun stops its workers on SIGTERM
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
        finally:
            signal.signal(signal.SIGTERM, previous)
        if code == 0:
            return
        # The first rank to fail is the cause; the others fail after it (a peer closed the connection).
        reports = sorted(Path(errors).glob("rank*.txt"), key=lambda p: (p.stat().st_mtime_ns, int(p.stem[4:])))
        if reports:
            raise PipelineError(f"{module} failed in {reports[0].stem.replace('rank', 'rank ')} of {nproc}: "
                                f"{reports[0].read_text().strip()}")
        raise PipelineError(f"{module} failed under torchrun with {nproc} processes (exit code {code}); its log above "
                            "names the rank and the error.")


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _die_with_parent() -> None:
    """In a child, before exec: get SIGKILL when the parent dies (Linux), so no process outlives the stage."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def init(device_type: str) -> None:
    """Join the process group when launched by torchrun (nccl on GPUs, gloo on the CPU); a no-op otherwise."""
    if not launched() or dist.is_initialized():
        return
    _die_with_parent()  # with torchrun: a killed launcher must not leave workers training on
    if device_type == "cuda":
        torch.cuda.set_device(local_rank())
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo", timeout=TIMEOUT)
    log.info("DDP rank %d of %d (%s)", rank(), world(), dist.get_backend())


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_world() -> int:
    """Processes sharing this machine's cores (torchrun's LOCAL_WORLD_SIZE)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def is_main() -> bool:
    """Rank 0 writes every file (checkpoints, CSVs, dvclive); without DDP the one process is rank 0."""
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def broadcast(obj):
    """Rank 0's value of `obj` on every rank (decisions such as early stopping are rank 0's)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank: each rank's EMA averages the statistics of its
    own batches, so without this the ranks would validate slightly different models, none of them the saved one."""
    if active():
        for b in module.buffers():
            dist.broadcast(b, src=0)


def sum_all(values: list[float]) -> list[float]:
    """Element-wise sums over the ranks (e.g. images seen and loss totals, for the epoch's train loss)."""
    if not active():
        return values
    t = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return t.cpu().tolist()


def local_batch(global_batch: int, processes: int | None = None) -> int:
    """This process's images per step: train.batch_size is the global batch, split evenly over the processes (world()
    unless given), so the same params take the same steps on 1 GPU or 2. A batch that does not divide evenly, or
    leaves a process fewer than 2 images, is refused with a PipelineError naming train.batch_size and train.gpus."""
    n = world() if processes is None else processes
    if problem := batch_split_problem(global_batch, n):
        raise PipelineError(problem + ".")
    return global_batch // n


def shard(n: int) -> np.ndarray:
    """The rows of 0..n-1 this rank predicts: every world()-th, so shards differ by one row at most."""
    return np.arange(rank(), n, world())


def gather_rows(part: np.ndarray, n: int) -> np.ndarray:
    """Every rank's shard (see shard) put back in the original row order, on every rank."""
    if not active():
        return part
    parts = [None] * world()
    dist.all_gather_object(parts, part)
    out = np.empty((n, *part.shape[1:]), dtype=part.dtype)
    for r, p in enumerate(parts):
        out[r::world()] = p
    return out
