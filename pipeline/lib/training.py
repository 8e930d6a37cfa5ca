"""Training one model into one folder (fold models, the refit, the all-cells model, the student and `bench plain`
alike): its config and seed from params, its processes (DDP), fit() with its curves and kept checkpoint, resumed or
reused when the files belong to this run, and its prediction CSVs."""
from __future__ import annotations

import logging
import sys
import time
import zlib
from dataclasses import fields
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline.lib import distributed as ddp
from pipeline.lib.checkpoints import kept_differences, load_checkpoint, run_fingerprint, save_checkpoint, set_aside
from pipeline.lib.common import seed_everything
from pipeline.lib.dataset import CellDataset
from pipeline.lib.engine import TrainConfig, fit, resolve_device
from pipeline.lib.models import ModelSpec, data_config
from pipeline.lib.predictions import eval_dataset, write_predictions, write_split_predictions
from pipeline.lib.transforms import AugParams, build_transform
from pipeline.lib.tta import TTASpec

log = logging.getLogger(__name__)


def for_backbone(params: dict, backbone: str) -> dict:
    """params as one model sees them: train.lr and train.epochs are train.lr_by_backbone's and
    train.epochs_by_backbone's entries for `backbone` when they have one, and the maps themselves are gone, so a
    model's fingerprint holds only its own (another's change leaves it be); train.pretrained is true or false for this
    model alone."""
    t = {k: v for k, v in params["train"].items() if k not in ("lr_by_backbone", "epochs_by_backbone")}
    t["lr"] = params["train"].get("lr_by_backbone", {}).get(backbone, t["lr"])  # idempotent: the maps are gone after
    t["epochs"] = params["train"].get("epochs_by_backbone", {}).get(backbone, t["epochs"])
    t["pretrained"] = starts_pretrained(t["pretrained"], backbone)  # a list of names becomes this model's answer
    return {**params, "train": t}


def starts_pretrained(pretrained: bool | list[str], backbone: str) -> bool:
    """train.pretrained for one model: true, false, or whether the list of timm names holds it."""
    return pretrained if isinstance(pretrained, bool) else backbone in pretrained


def train_config(p: dict, seed: int, **overrides) -> TrainConfig:
    """TrainConfig from a params section (train: or distill:), keeping only the keys it knows."""
    known = {f.name for f in fields(TrainConfig)}
    # sync_bn means nothing in one process: it must not make a one-process run differ from another (resume).
    return TrainConfig(**{**{k: v for k, v in p.items() if k in known}, "seed": seed, "world_size": ddp.world(),
                          **({"sync_bn": False} if ddp.world() == 1 else {}), **overrides})


def start_processes(module: str, p: dict) -> bool:
    """DDP for a training stage (`p` its train: params): under torchrun join the process group and return False (go
    on); when train.gpus asks for more than one process, re-run this stage under torchrun and return True (the
    caller is done); otherwise False (one process)."""
    if ddp.launched():
        ddp.init(resolve_device(p["device"]).type)
        return False
    n = ddp.processes_wanted(p["gpus"], p["device"])
    if n > 1:
        ddp.local_batch(p["batch_size"], n)  # a global batch the processes cannot share stops here, before torchrun
        ddp.relaunch(module, sys.argv[1:], n)
        return True
    return False


def derived_seed(seed: int, *parts) -> int:
    """A stable per-(backbone, fold) seed (Python's hash() is salted per process)."""
    return (seed + zlib.crc32("/".join(map(str, parts)).encode())) % 2**31


class EpochProgress:
    """What fit() logs each epoch to (dvclive's Live, or None), plus one line per trained epoch for a person: its
    seconds and an estimate of this model's time left."""

    # fit() first replays a resumed run's epochs: those steps come at once, a trained one takes longer than this.
    REPLAYED_S = 0.2

    def __init__(self, live, name: str, epochs: int, early_stop: bool):
        self.live, self.name, self.epochs, self.early_stop = live, name, epochs, early_stop
        self.step, self.since, self.trained = 0, time.perf_counter(), []

    def log_metric(self, key: str, value) -> None:
        if self.live is not None:
            self.live.log_metric(key, value)

    def next_step(self) -> None:
        if self.live is not None:
            self.live.next_step()
        now, self.step = time.perf_counter(), self.step + 1
        took, self.since = now - self.since, now
        if not self.trained and took < self.REPLAYED_S:
            return
        self.trained.append(took)
        left = sum(self.trained) / len(self.trained) * (self.epochs - self.step) / 60
        log.info("%s: epoch %d/%d took %.0f s; %s %.1f min left for this model", self.name, self.step, self.epochs,
                 took, "at most" if self.early_stop else "about", left)


def train_logged(model, arch: str, train_ds, val_ds, val_labels, loss_fn, cfg: TrainConfig, out: Path,
                 params: dict, fingerprint: dict, name: str = "") -> tuple[dict, torch.nn.Module]:
    """fit() with dvclive curves in out/live and the kept checkpoint in out/checkpoint.pt; returns the kept
    epoch's metrics and the model rebuilt from that checkpoint (teachers and student alike).

    `fingerprint` (pipeline.lib.checkpoints.fingerprint) names everything the weights depend on: last.pt is resumed and
    checkpoint.pt reused only when it is unchanged, and a half-trained last.pt only at the process count (and
    train.sync_bn) it was trained with."""
    try:
        from dvclive import Live  # imported late: it is slow to import and only the stages need it
    except ImportError:  # a machine without DVC (docs/gpu.md, `wheelhouse --without-dvc`): no curves, same model
        Live = None
    ckpt, last = out / "checkpoint.pt", out / "last.pt"
    # The kept checkpoint belongs to last.pt's run: if it was trained on other inputs (or is gone), so was last.pt.
    run = run_fingerprint(cfg, fingerprint)
    if ddp.is_main() and last.is_file() and (diff := kept_differences(ckpt, last, fingerprint, run)):
        set_aside(last, diff)
    ddp.barrier()
    save = lambda m, epoch, metric: save_checkpoint(ckpt, m, arch=arch, params=params, epoch=epoch, metric=metric,
                                                    extra={"fingerprint": fingerprint})
    progress = lambda live: EpochProgress(live, name or arch, cfg.epochs, cfg.select_best and val_ds is not None)
    if not ddp.is_main():  # rank 0 writes the curves and the checkpoint
        best = fit(model, train_ds, val_ds, val_labels, loss_fn, cfg, out, None, None, fingerprint)
        model, _ = load_checkpoint(ckpt, resolve_device(cfg.device))
        return best, model
    if Live is None:
        log.warning("dvclive is not installed: %s gets no training curves (pip install dvclive)", out)
        best = fit(model, train_ds, val_ds, val_labels, loss_fn, cfg, out, progress(None), save, fingerprint)
        return best, load_checkpoint(ckpt, resolve_device(cfg.device))[0]
    # Fresh curves every run: fit() replays the epochs it resumes, so the curves always match last.pt.
    with Live(dir=str(out / "live"), resume=False, dvcyaml=None, save_dvc_exp=False) as live:
        best = fit(model, train_ds, val_ds, val_labels, loss_fn, cfg, out, progress(live), save, fingerprint)
        for k, v in best.items():
            live.summary[k] = v
    model, _ = load_checkpoint(ckpt, resolve_device(cfg.device))
    return best, model


def train_model(spec: ModelSpec, images: np.ndarray, index: pd.DataFrame, rows: np.ndarray, target: np.ndarray,
                out: Path, *, aug: AugParams, tta: TTASpec, loss_fn, cfg: TrainConfig, record: dict, fingerprint: dict,
                val_rows: np.ndarray | None = None, name: str = "") -> tuple[dict, torch.nn.Module, dict]:
    """The one way to train a model: `spec` on cache rows `rows` against `target` ((N, 2): label, soft target), into
    `out` (checkpoint.pt, last.pt, live/), validated on `val_rows` (None: the last epoch is kept), then its oof.csv
    (for `val_rows`), test.csv and hidden.csv. `record` is what its checkpoint records, `fingerprint` what its weights
    depend on (checkpoints.model_fingerprint). Returns the kept epoch's metrics, the model and the tables by name."""
    seed_everything(cfg.seed)
    model = spec.create()
    norm = data_config(model)
    train_ds = CellDataset(images[rows], target, build_transform(True, aug, **norm), seed=cfg.seed)
    labels = index["label"].to_numpy(dtype=float)
    val_ds = None if val_rows is None else eval_dataset(images[val_rows], norm)
    out.mkdir(parents=True, exist_ok=True)
    log.info("%s: %d train / %d validation images, seed %d", name or spec.backbone, len(rows),
             0 if val_rows is None else len(val_rows), cfg.seed)
    best, model = train_logged(model, spec.backbone, train_ds, val_ds,
                               None if val_rows is None else labels[val_rows].astype(int), loss_fn, cfg, out, record,
                               fingerprint, name=name or spec.backbone)
    tables = {} if val_rows is None else {
        "oof": write_predictions(model, images, index, val_rows, out / "oof.csv", cfg.inference, tta, norm)}
    tables.update(write_split_predictions(model, images, index, out, cfg.inference, tta, norm))
    return best, model, tables
