"""The one training loop (teachers and student) and the one prediction function (OOF, test, hidden, TTA)."""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from pipeline import batch_aug
from pipeline import fingerprint as fp
from pipeline import precision as amp_precision
from pipeline.common import PipelineError
from pipeline.dataset import CellDataset
from pipeline.metrics import binary_metrics
from pipeline.tta import apply_view

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.05
    grad_clip: float = 1.0
    ema_decay: float = 0.99
    patience: int = 3
    select_best: bool = True   # keep the best validation epoch; the student keeps its last (no held-out data)
    seed: int = 0
    num_workers: int = 1
    device: str = "auto"
    precision: str = "auto"    # auto | fp32 | bf16 | fp16, resolved per device and backbone by precision.choose
    mixup: float = 0.0         # Beta alpha of mixup (0 = off)
    cutmix: float = 0.0        # Beta alpha of CutMix (0 = off); with both on, each takes half the batches
    progressive: float = 1.0   # progressive resizing: first epoch at this fraction of the side (1 = off)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise PipelineError("train.device is cuda but no CUDA GPU is visible; set train.device to auto or cpu.")
    return torch.device(name)


def setup_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick the fastest kernels
    else:
        # One thread per core: on 2 cores, reserving one for the augmentation worker measured slower
        # (the worker needs a fraction of a core at 64 px; see `python -m pipeline.bench train`).
        torch.set_num_threads(os.cpu_count() or 1)


def loader(ds: Dataset, cfg: TrainConfig, device: torch.device, *, shuffle: bool, epoch: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(cfg.seed * 7919 + epoch)
    return DataLoader(ds, batch_size=cfg.batch_size, shuffle=shuffle, drop_last=shuffle and len(ds) > cfg.batch_size,
                      num_workers=cfg.num_workers, pin_memory=device.type == "cuda", generator=g)


@torch.no_grad()
def predict(model: torch.nn.Module, ds: Dataset, cfg: TrainConfig, device: torch.device,
            views: list[str] = ("identity",), crop_scale: float = 0.875, desc: str = "predict") -> np.ndarray:
    """Parasitized probability per image and view, shape (N, len(views)); views act on whole batches."""
    model.eval()
    # Predictions stay fp32 on the CPU; on a GPU they use the card's fast half precision.
    amp, _ = amp_precision.autocast(amp_precision.choose("auto", device, "") if device.type == "cuda" else "fp32",
                                    device)
    out = []
    for x, _ in tqdm(loader(ds, cfg, device, shuffle=False), desc=desc, leave=False, unit="batch", disable=None):
        x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with amp:
            probs = [F.softmax(model(apply_view(x, v, crop_scale)).float(), 1)[:, 1] for v in views]
        out.append(torch.stack(probs, 1).cpu())
    return torch.cat(out).numpy()


# TrainConfig fields that change speed, not the weights: a run may resume with other values.
_SPEED_ONLY = ("num_workers", "device")


def run_fingerprint(cfg: TrainConfig, fingerprint: dict | None) -> dict:
    """The caller's fingerprint (params and data digests) plus the TrainConfig fields that shape training."""
    base = fingerprint or fp.make({}, {})
    config = {f"config.{k}": v for k, v in asdict(cfg).items() if k not in _SPEED_ONLY}
    return fp.make({**base["params"], **config}, base["inputs"])


def resume_state(last: Path, current: dict) -> dict | None:
    """The contents of `last` if it was trained on exactly `current`'s inputs; otherwise it is set aside (removed)."""
    if not last.is_file():
        return None
    try:
        ck = torch.load(last, map_location="cpu", weights_only=False)
        diff = fp.differences(ck.get("fingerprint"), current)
    except Exception as e:  # a truncated or foreign file must not stop a fresh run
        ck, diff = None, [f"it cannot be read ({type(e).__name__}: {e})"]
    if not diff:
        return ck
    log.warning("Setting aside %s and training from scratch, because %s", last, "; ".join(diff))
    last.unlink()
    return None


def fit(model: torch.nn.Module, train_ds: CellDataset, val_ds: Dataset | None, val_labels: np.ndarray | None,
        loss_fn: Callable, cfg: TrainConfig, out_dir: Path, live=None, save: Callable | None = None,
        fingerprint: dict | None = None) -> dict:
    """Train with AdamW, warmup+cosine, EMA, clipping and early stopping; resume from out_dir/last.pt.

    last.pt is resumed only if `fingerprint` (see pipeline.fingerprint) and cfg match the run that wrote it.
    `save(model, epoch, metrics)` writes the kept checkpoint; `live` gets every epoch's metrics, the resumed
    ones replayed, so the curves always match last.pt. Returns the kept epoch's metrics."""
    device = resolve_device(cfg.device)
    setup_device(device)
    model = model.to(device).to(memory_format=torch.channels_last)
    opt = create_optimizer_v2(model, "adamw", lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = max(1, len(loader(train_ds, cfg, device, shuffle=True)))
    sched = CosineLRScheduler(opt, t_initial=cfg.epochs * steps, lr_min=cfg.lr * 0.01, warmup_t=int(cfg.warmup_epochs * steps),
                              warmup_lr_init=cfg.lr * 0.01, t_in_epochs=False)
    ema = ModelEmaV3(model, decay=cfg.ema_decay, use_warmup=True)
    arch = getattr(model, "pretrained_cfg", {}).get("architecture") or type(model).__name__.lower()
    precision = amp_precision.choose(cfg.precision, device, arch)
    amp, scaler = amp_precision.autocast(precision, device)
    log.info("Training %s on %s in %s (train.precision %s), batch %d", arch, device, precision, cfg.precision,
             cfg.batch_size)
    state = {"epoch": 0, "best": None, "best_epoch": 0, "bad_epochs": 0, "done": False, "history": []}
    last = out_dir / "last.pt"
    current = run_fingerprint(cfg, fingerprint)
    if (ck := resume_state(last, current)) is not None:
        model.load_state_dict(ck["model"]), ema.load_state_dict(ck["ema"]), opt.load_state_dict(ck["opt"])
        torch.set_rng_state(ck["rng"])
        if scaler is not None and ck.get("scaler"):
            scaler.load_state_dict(ck["scaler"])
        state = ck["state"]
        log.info("Resuming from %s after epoch %d (same params and data)", last, state["epoch"])
        for metrics in state["history"]:
            _log_live(live, metrics)
    if state["done"]:
        log.info("Already finished (kept epoch %d); not retraining", state["best_epoch"])
        return state["best"]
    for epoch in range(state["epoch"] + 1, cfg.epochs + 1):
        model.train()
        train_ds.epoch = epoch  # per-epoch augmentation seeds, copied into fresh workers each epoch
        t0, seen, total = time.perf_counter(), 0, 0.0
        rng = np.random.default_rng([cfg.seed, epoch])  # per epoch, so a resumed run mixes as an unbroken one
        size = batch_aug.progressive_size(epoch, cfg.epochs, train_ds.images.shape[1], cfg.progressive)
        for step, (x, y) in enumerate(tqdm(loader(train_ds, cfg, device, shuffle=True, epoch=epoch),
                                           desc=f"epoch {epoch}", leave=False, unit="batch", disable=None)):
            x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            y = y.to(device, non_blocking=True)
            x, y = batch_aug.mix(batch_aug.resize(x, size), y, cfg.mixup, cfg.cutmix, rng)
            with amp:
                loss = loss_fn(model(x).float(), y)
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
            seen, total = seen + len(x), total + loss.item() * len(x)
        metrics = {"train_loss": total / max(seen, 1), "lr": opt.param_groups[0]["lr"],
                   "images_per_s": seen / (time.perf_counter() - t0), "train_size": size}
        if val_ds is not None:
            p = predict(ema.module, val_ds, cfg, device, desc="validate")[:, 0]
            metrics.update({f"val_{k}": v for k, v in binary_metrics(val_labels, p).items()})
        improved = state["best"] is None or not cfg.select_best or _better(metrics, state["best"])
        log.info("epoch %d/%d %s%s", epoch, cfg.epochs, " ".join(f"{k}={v:.4g}" for k, v in metrics.items()),
                 " *" if improved else "")
        state["bad_epochs"] = 0 if improved else state["bad_epochs"] + 1
        if improved:
            state["best"], state["best_epoch"] = {**metrics, "epoch": epoch}, epoch
            if save:
                save(ema.module, epoch, state["best"])
        state["epoch"] = epoch
        state["history"].append(metrics)
        state["done"] = epoch == cfg.epochs or (cfg.select_best and state["bad_epochs"] >= cfg.patience)
        # Write to a temporary file and rename, so a kill mid-write never leaves a corrupt last.pt.
        torch.save({"fingerprint": current, "model": model.state_dict(), "ema": ema.state_dict(),
                    "opt": opt.state_dict(), "rng": torch.get_rng_state(), "state": state,
                    "scaler": scaler.state_dict() if scaler is not None else None}, last.with_suffix(".tmp"))
        last.with_suffix(".tmp").replace(last)
        _log_live(live, metrics)
        if state["done"]:
            break
    return state["best"]


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
