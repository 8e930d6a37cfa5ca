"""The one training loop (teachers and student) and the one prediction function (OOF, test, hidden, TTA)."""
from __future__ import annotations

import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset
from tqdm import tqdm

from pipeline.lib import batch_aug
from pipeline.lib import distributed as ddp
from pipeline.lib import precision as amp_precision
from pipeline.lib.checkpoints import read_checkpoint, resume_state, run_fingerprint
from pipeline.lib.common import PipelineError, available_cores, written_whole
from pipeline.lib.dataset import CellDataset
from pipeline.lib.metrics import binary_metrics
from pipeline.lib.tta import apply_view

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """How one model trains. Its values come from params.yaml, which holds every default (training.train_config);
    it has none of its own but the two a stage sets."""
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    warmup_epochs: float
    label_smoothing: float
    grad_clip: float
    ema_decay: float
    patience: int
    seed: int
    num_workers: int | str     # auto: 0 on the CPU, the cores (shared between the processes) on a GPU
    device: str
    precision: str             # auto | fp32 | bf16 | fp16, resolved per device and backbone by precision.choose
    mixup: float               # Beta alpha of mixup (0 = off)
    cutmix: float              # Beta alpha of CutMix (0 = off); with both on, each takes half the batches
    progressive: float         # progressive resizing: first epoch at this fraction of the side (1 = off)
    sync_bn: bool              # DDP: BatchNorm statistics over the global batch (SyncBatchNorm)
    compile: bool | str        # torch.compile the training forward (auto = off; see compiled)
    select_best: bool = True   # keep the best validation epoch; the student keeps its last (no held-out data)
    world_size: int = 1        # DDP processes (set by the stage); batch_size is the global batch, split over them

    @property
    def inference(self) -> "InferConfig":
        """The prediction side of this config: validation and the OOF, test and hidden tables."""
        return InferConfig(self.batch_size, self.num_workers, self.device)


@dataclass(frozen=True)
class InferConfig:
    """How to predict: the batch (a CPU raises it to EVAL_BATCH_CPU), the loader workers and the device."""
    batch_size: int = 64
    num_workers: int | str = 0
    device: str = "auto"


def resolve_device(name: str) -> torch.device:
    """The torch device for train.device (auto: CUDA, else Apple's GPU, else the CPU); under DDP on GPUs, this
    process's own GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if mps_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise PipelineError("train.device is cuda but no CUDA GPU is visible; set train.device to auto or cpu.")
    if name == "mps" and not mps_available():
        raise PipelineError("train.device is mps but torch has no Apple GPU (MPS) here; set train.device to auto or "
                            "cpu.")
    return torch.device("cuda", ddp.local_rank()) if name == "cuda" else torch.device(name)


def mps_available() -> bool:
    """Apple silicon's GPU through torch's MPS backend (macOS 12.3+, torch built with it)."""
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def cores() -> int:
    """Cores this process may use: its CPU affinity (taskset, containers) shared among the DDP processes here."""
    return max(1, available_cores() // ddp.local_world())


def setup_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick the fastest kernels
    else:
        # One thread per core: the augmentation runs in the main process on a CPU (see workers), so no core is
        # kept free for a loader worker (`python -m pipeline.tools.bench train` times both).
        torch.set_num_threads(cores())


def workers(cfg: TrainConfig | InferConfig, device: torch.device) -> int:
    """train.num_workers, with auto resolved: on the CPU 0 (a worker fights torch's threads for the same cores;
    docs/results.md, "DataLoader workers"), on a GPU one per core this process may use, at most 8."""
    if cfg.num_workers != "auto":
        return int(cfg.num_workers)
    return min(8, cores()) if device.type == "cuda" else 0


class EpochTagged(Sampler):
    """Indices of `inner` tagged with the epoch (epoch * n + i), so CellDataset seeds each sample's augmentation from
    (seed, epoch, i) even in persistent workers, whatever the number of processes."""

    def __init__(self, inner: Sampler, n: int):
        self.inner, self.n, self.epoch = inner, n, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.inner.set_epoch(epoch)

    def __iter__(self):
        return (self.epoch * self.n + int(i) for i in self.inner)

    def __len__(self) -> int:
        return len(self.inner)


def train_loader(ds: Dataset, cfg: TrainConfig, device: torch.device) -> DataLoader:
    """The training loader, built once per fit: this rank's share of a per-epoch shuffle (DistributedSampler, also
    with one process), workers kept alive across epochs."""
    sampler = EpochTagged(DistributedSampler(ds, num_replicas=ddp.world(), rank=ddp.rank(), shuffle=True,
                                             seed=cfg.seed * 7919), len(ds))
    n, batch = workers(cfg, device), ddp.local_batch(cfg.batch_size)  # this rank's share of the global batch
    return DataLoader(ds, batch_size=batch, sampler=sampler, drop_last=len(sampler) > batch,
                      num_workers=n, pin_memory=device.type == "cuda", persistent_workers=n > 0,
                      prefetch_factor=4 if n > 0 else None)


EVAL_BATCH_CPU = 128  # the smallest prediction batch on a CPU


def loader(ds: Dataset, cfg: InferConfig, device: torch.device, persistent: bool = False) -> DataLoader:
    """In-order batches, for prediction (and validation: `persistent` keeps its workers across epochs)."""
    # Without gradients a CPU predicts faster in bigger batches (fewer, larger matrix products per image); a GPU
    # keeps its process's training batch, known to fit its memory.
    batch = ddp.local_batch(cfg.batch_size) if device.type == "cuda" else max(cfg.batch_size, EVAL_BATCH_CPU)
    n = workers(cfg, device)
    return DataLoader(ds, batch_size=batch, shuffle=False, num_workers=n, pin_memory=device.type == "cuda",
                      persistent_workers=persistent and n > 0)


def eval_loader(ds: Dataset, cfg: InferConfig, device: torch.device, shard: bool, persistent: bool = False
                ) -> DataLoader:
    """The prediction loader over `ds`, or under DDP with `shard` over this rank's every world()-th image."""
    return loader(Subset(ds, ddp.shard(len(ds)).tolist()) if shard and ddp.active() else ds, cfg, device, persistent)


@torch.no_grad()
def predict(model: torch.nn.Module, ds: Dataset, cfg: InferConfig, device: torch.device,
            views: list[str] = ("identity",), crop_scale: float = 0.875, desc: str = "predict", shard: bool = False,
            precision: str | None = None, batches: DataLoader | None = None) -> np.ndarray:
    """Parasitized probability per image and view, shape (N, len(views)); views act on whole batches.

    precision: the one the model trained in (default: the `trained_precision` its checkpoint gave it on loading,
    else fp32), run where this device has it natively. shard: under DDP every rank predicts every world()-th image
    and all get the whole array, in order (every rank must call it then). batches: the loader over `ds` (this rank's
    shard of it) when the caller keeps one, as validation does (eval_loader)."""
    n = len(ds)
    batches = batches or eval_loader(ds, cfg, device, shard)
    # Inputs are channels_last; weights in the same layout, or every convolution converts them.
    model.eval().to(memory_format=torch.channels_last)
    trained = precision or getattr(model, "trained_precision", "fp32")
    run_in = amp_precision.for_inference(trained, device)
    amp, _ = amp_precision.autocast(run_in, device)
    out = []
    quiet = None if ddp.is_main() else True  # one progress bar, rank 0's
    for x, _ in tqdm(batches, desc=desc, leave=False, unit="batch", disable=quiet):
        x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with amp:
            probs = [F.softmax(model(apply_view(x, v, crop_scale)).float(), 1)[:, 1] for v in views]
        out.append(torch.stack(probs, 1).cpu())
    probs = torch.cat(out).numpy() if out else np.zeros((0, len(views)), np.float32)
    probs = ddp.gather_rows(probs, n) if shard else probs  # every rank sees (and raises on) the same array
    if not np.isfinite(probs).all():
        arch = getattr(model, "pretrained_cfg", {}).get("architecture") or type(model).__name__
        raise PipelineError(
            f"{arch}: {int((~np.isfinite(probs)).sum())} of {probs.size} probabilities are NaN or infinite predicting "
            f"{desc} in {run_in} on {device} (trained in {trained}): its activations overflow there. Set "
            "`train.precision: fp32` (or bf16 on a card that has it natively) and run `dvc repro` again.")
    return probs


def fit(model: torch.nn.Module, train_ds: CellDataset, val_ds: Dataset | None, val_labels: np.ndarray | None,
        loss_fn: Callable, cfg: TrainConfig, out_dir: Path, live=None, save: Callable | None = None,
        fingerprint: dict | None = None) -> dict:
    """Train with AdamW, warmup+cosine, EMA, clipping and early stopping; resume from out_dir/last.pt.

    last.pt is resumed only if `fingerprint` (pipeline.lib.checkpoints) and cfg match the run that wrote it.
    `save(model, epoch, metrics)` writes the kept checkpoint; `live` gets every epoch's metrics, the resumed
    ones replayed, so the curves always match last.pt. Returns the kept epoch's metrics. Under DDP every rank
    calls it; rank 0 alone saves, writes last.pt and decides when to stop."""
    device = resolve_device(cfg.device)
    setup_device(device)
    model = model.to(device).to(memory_format=torch.channels_last)
    if cfg.sync_bn and ddp.active() and device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    elif cfg.sync_bn and ddp.active():
        log.warning("train.sync_bn is for GPUs (torch's SyncBatchNorm needs CUDA); BatchNorm stays per process here")
    opt = create_optimizer_v2(model, "adamw", lr=cfg.lr, weight_decay=cfg.weight_decay)
    batches = train_loader(train_ds, cfg, device)
    steps = max(1, len(batches))
    sched = CosineLRScheduler(opt, t_initial=cfg.epochs * steps, lr_min=cfg.lr * 0.01, warmup_t=int(cfg.warmup_epochs * steps),
                              warmup_lr_init=cfg.lr * 0.01, t_in_epochs=False)
    ema = ModelEmaV3(model, decay=cfg.ema_decay, use_warmup=True)
    arch = getattr(model, "pretrained_cfg", {}).get("architecture") or type(model).__name__.lower()
    precision = amp_precision.choose(cfg.precision, device, arch)
    amp, scaler = amp_precision.autocast(precision, device)
    model.trained_precision = ema.module.trained_precision = precision  # saved in the checkpoint, predicted in
    card = (f" ({torch.cuda.get_device_name(device)}, capability %d.%d)" % torch.cuda.get_device_capability(device)
            if device.type == "cuda" else "")
    log.info("Training %s on %s%s in %s (train.precision %s), channels_last, batch %d (global) = %d x %d "
             "process(es), %d loader worker(s)", arch, device, card, precision, cfg.precision, cfg.batch_size,
             ddp.local_batch(cfg.batch_size), ddp.world(), workers(cfg, device))
    state = {"epoch": 0, "best": None, "best_epoch": 0, "bad_epochs": 0, "done": False, "history": []}
    last = out_dir / "last.pt"
    current = run_fingerprint(cfg, fingerprint)
    # Rank 0 decides whether last.pt belongs to this run (and sets it aside if not); the others then read it too.
    ck = resume_state(last, current) if ddp.is_main() else None
    if ddp.broadcast(ck is not None) and ck is None:
        ck = read_checkpoint(last)
    if ck is not None:
        state = ck["state"]
        if not state["done"]:  # a finished run's last.pt holds no weights (see below)
            model.load_state_dict(ck["model"]), ema.load_state_dict(ck["ema"]), opt.load_state_dict(ck["opt"])
            if scaler is not None and ck.get("scaler"):
                scaler.load_state_dict(ck["scaler"])
        log.info("Resuming from %s after epoch %d (same params and data)", last, state["epoch"])
        for metrics in state["history"]:
            _log_live(live, metrics)
    if state["done"]:
        log.info("Already finished (kept epoch %d); not retraining", state["best_epoch"])
        return state["best"]
    # The DDP wrapper averages gradients across ranks; EMA, optimizer and checkpoints use the plain module.
    net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if ddp.active() else model
    net = compiled(net, cfg.compile, device)
    # Built once: a GPU's validation workers start once per fit, not once per epoch.
    val_batches = None if val_ds is None else eval_loader(val_ds, cfg.inference, device, shard=True, persistent=True)
    for epoch in range(state["epoch"] + 1, cfg.epochs + 1):
        model.train()
        batches.sampler.set_epoch(epoch)  # this epoch's shuffle and augmentation seeds
        # The loss is summed on the device and read once per epoch: a .item() per step would wait for the GPU.
        t0, seen, total = time.perf_counter(), 0, torch.zeros((), device=device)
        rng = seed_epoch(cfg.seed, epoch, ddp.rank())
        size = batch_aug.progressive_size(epoch, cfg.epochs, train_ds.images.shape[1], cfg.progressive)
        for step, (x, y) in enumerate(tqdm(batches, desc=f"epoch {epoch}", leave=False, unit="batch",
                                           disable=None if ddp.is_main() else True)):
            x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            y = y.to(device, non_blocking=True)
            x, y = batch_aug.mix(batch_aug.resize(x, size), y, cfg.mixup, cfg.cutmix, rng)
            with amp:
                loss = loss_fn(net(x).float(), y)
            opt.zero_grad(set_to_none=True)
            if scaler:
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
            else:
                loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            scaler.step(opt) if scaler else opt.step()
            if scaler:
                scaler.update()
            sched.step_update((epoch - 1) * steps + step + 1)
            ema.update(model, step=(epoch - 1) * steps + step)
            seen, total = seen + len(x), total + loss.detach() * len(x)
        seen, total = ddp.sum_all([seen, total.item()])
        metrics = {"train_loss": total / max(seen, 1), "lr": opt.param_groups[0]["lr"],
                   "images_per_s": seen / (time.perf_counter() - t0), "train_size": size}
        ddp.broadcast_buffers(ema.module)  # every rank validates (and rank 0 saves) the same model
        if val_ds is not None:
            p = predict(ema.module, val_ds, cfg.inference, device, desc="validate", shard=True,
                        batches=val_batches)[:, 0]
            metrics.update({f"val_{k}": v for k, v in binary_metrics(val_labels, p).items()})
        improved = ddp.broadcast(state["best"] is None or not cfg.select_best or _better(metrics, state["best"]))
        log.info("epoch %d/%d %s%s", epoch, cfg.epochs, " ".join(f"{k}={v:.4g}" for k, v in metrics.items()),
                 " *" if improved else "")
        state["bad_epochs"] = 0 if improved else state["bad_epochs"] + 1
        if improved:
            state["best"], state["best_epoch"] = {**metrics, "epoch": epoch}, epoch
            if save and ddp.is_main():
                save(ema.module, epoch, state["best"])
        state["epoch"] = epoch
        state["history"].append(metrics)
        state["done"] = ddp.broadcast(epoch == cfg.epochs or (cfg.select_best and state["bad_epochs"] >= cfg.patience))
        if ddp.is_main():
            # A finished run is never trained further, only recognised: its last.pt keeps the state alone, not
            # the weights, EMA and optimizer moments (4x checkpoint.pt, copied into DVC's cache for every fold).
            saved = {"fingerprint": current, "state": state} if state["done"] else {
                "fingerprint": current, "model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                "state": state,
                "scaler": scaler.state_dict() if scaler is not None else None}
            # Write to a temporary file and rename, so a kill mid-write never leaves a corrupt last.pt.
            with written_whole(last) as tmp:
                torch.save(saved, tmp)
        _log_live(live, metrics)
        if state["done"]:
            break
    ddp.barrier()  # the kept checkpoint is on disk before any rank reads it
    return state["best"]


def compiled(net: torch.nn.Module, setting: bool | str, device: torch.device) -> torch.nn.Module:
    """`net` through torch.compile when train.compile asks for it (auto: off), else `net`. Only the training forward is
    compiled: checkpoints, EMA and predictions use the plain module, so no `_orig_mod.` key reaches a file."""
    if setting is not True:
        return net
    if device.type == "cpu" and not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "c++", "clang++")):
        log.warning("train.compile is true but no C++ compiler is on PATH (torch.compile on the CPU needs one): "
                    "training uncompiled. Install g++ (or clang++), or set train.compile: auto.")
        return net
    import torch._dynamo

    torch._dynamo.config.suppress_errors = True  # a graph it cannot compile runs eagerly, with torch's warning
    log.info("train.compile: the training forward goes through torch.compile (the first steps of each image size "
             "compile it)")
    return torch.compile(net)


def seed_epoch(seed: int, epoch: int, rank: int) -> np.random.Generator:
    """Seed torch (the CPU and every CUDA generator) for one epoch of one rank, and return that epoch's numpy
    generator (mixup): a resumed run draws as an unbroken one with no RNG state saved, and the ranks draw apart."""
    rng = np.random.default_rng([seed, epoch, rank])
    torch.manual_seed(int(rng.integers(2**62)))
    return rng


def _log_live(live, metrics: dict) -> None:
    if live is not None:
        for k, v in metrics.items():
            live.log_metric(k, v)
        live.next_step()


def _better(new: dict, best: dict) -> bool:
    """Higher validation AUC, then lower log loss, wins (AUC saturates quickly on easy folds)."""
    a, b = new.get("val_roc_auc", math.nan), best.get("val_roc_auc", math.nan)
    if not math.isclose(a, b, abs_tol=1e-6):
        return a > b
    return new["val_log_loss"] < best["val_log_loss"]
