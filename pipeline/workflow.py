"""What the train and distill stages share: configs and seeds, resume fingerprints, logged training, prediction CSVs."""
from __future__ import annotations

import logging
import sys
import zlib
from dataclasses import fields
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline import distributed as ddp
from pipeline import fingerprint as fp
from pipeline.common import written_whole
from pipeline.dataset import CellDataset, split_rows, targets
from pipeline.engine import TrainConfig, fit, predict, resolve_device, run_fingerprint
from pipeline.models import UntrustedCheckpoint, load_checkpoint, read_checkpoint, save_checkpoint

log = logging.getLogger(__name__)


def for_backbone(params: dict, backbone: str) -> dict:
    """params as one model sees them: train.lr is train.lr_by_backbone's entry for `backbone` when it has one, and the
    map itself is gone, so a model's fingerprint holds only its own learning rate (another's change leaves it be)."""
    t = {k: v for k, v in params["train"].items() if k != "lr_by_backbone"}
    t["lr"] = params["train"].get("lr_by_backbone", {}).get(backbone, t["lr"])  # idempotent: the map is gone after
    return {**params, "train": t}


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


def data_digests(prepared: Path, *files: Path) -> dict[str, str]:
    """Content digests of the prepared cache and any other data file a model learns from (the folds CSV)."""
    paths = [prepared / "images.npy", prepared / "index.csv", *files]
    return {**{p.name: fp.file_digest(p) for p in paths}, "training code": fp.code_digest()}


def write_predictions(model, images, index, rows, out_csv: Path, cfg: TrainConfig, views: list[str], crop_scale: float,
                      transform) -> pd.DataFrame:
    """Write and return img_name, prob (plain) and prob_tta (mean over the TTA views) for the given cache rows.

    Under DDP every rank predicts a shard and gets the whole table; rank 0 writes it."""
    names = ["identity", *[v for v in views if v != "identity"]]
    ds = CellDataset(images[rows], targets(np.zeros(len(rows))), transform)
    probs = predict(model, ds, cfg, resolve_device(cfg.device), names, crop_scale, desc=out_csv.stem, shard=True)
    df = pd.DataFrame({"img_name": index["img_name"].to_numpy()[rows], "prob": probs[:, 0],
                       "prob_tta": probs[:, [names.index(v) for v in views]].mean(1)})
    _write_csv(df, out_csv)
    return df


def _write_csv(df: pd.DataFrame, path: Path) -> None:
    if ddp.is_main():
        with written_whole(path) as tmp:  # a later stage never reads a truncated table
            df.to_csv(tmp, index=False, float_format="%.6f")


def write_split_predictions(model, images, index, out: Path, cfg: TrainConfig, views: list[str], crop_scale: float,
                            transform, splits=("test", "hidden")) -> dict[str, pd.DataFrame]:
    """write_predictions for each split into out/<split>.csv; a split holding the same images as an earlier one (the
    public layout's hidden set is its test holdout) reuses that table instead of predicting them again."""
    # Same images: the same names with the same content digests (prepare's `hash`), in the same order.
    keys = index[["img_name", "hash"]].to_numpy() if "hash" in index else None
    tables, done = {}, {}
    for split in splits:
        rows = split_rows(index, split)
        same = next((s for s, r in done.items()
                     if keys is not None and len(r) == len(rows) and (keys[r] == keys[rows]).all()), None)
        if same is None:
            tables[split] = write_predictions(model, images, index, rows, out / f"{split}.csv", cfg, views,
                                              crop_scale, transform)
            done[split] = rows
        else:
            tables[split] = tables[same]
            _write_csv(tables[split], out / f"{split}.csv")
    return tables


def _checkpoint_differences(ckpt: Path, last: Path, fingerprint: dict, run: dict) -> list[str]:
    """What differs between the kept checkpoint's inputs and this run's, or between it and the epoch last.pt
    says was kept (a kill between writing the two), or, for a half-trained last.pt, between its process split and
    this run's (`run`, engine.run_fingerprint); empty when both belong to this run."""
    if not ckpt.is_file():
        return [f"{ckpt} is missing"]
    path = ckpt  # the file being read, for the reason
    try:
        kept = read_checkpoint(ckpt)
        path = last
        resumable = read_checkpoint(last)
        state = resumable.get("state", {})
    except UntrustedCheckpoint as e:  # someone else's file, which could run code: never loaded
        return [f"{path} is not weights only: {e.reason}"]
    except Exception as e:  # a truncated or foreign file: it does not belong to this run
        return [f"{path} cannot be read ({type(e).__name__}: {e})"]
    if kept.get("epoch") != state.get("best_epoch"):
        return [f"{ckpt} holds epoch {kept.get('epoch')} but {last} kept epoch {state.get('best_epoch')}"]
    # A finished model is reused at any process count; a half-trained one resumes only at its own.
    return fp.differences(kept.get("fingerprint"), fingerprint) or (
        [] if state.get("done") else fp.resume_only_differences(resumable.get("fingerprint"), run))


def train_logged(model, arch: str, train_ds, val_ds, val_labels, loss_fn, cfg: TrainConfig, out: Path,
                 params: dict, fingerprint: dict) -> tuple[dict, torch.nn.Module]:
    """fit() with dvclive curves in out/live and the kept checkpoint in out/checkpoint.pt; returns the kept
    epoch's metrics and the model rebuilt from that checkpoint (teachers and student alike).

    `fingerprint` (pipeline.fingerprint.make) names everything the weights depend on: last.pt is resumed and
    checkpoint.pt reused only when it is unchanged, and a half-trained last.pt only at the process count (and
    train.sync_bn) it was trained with."""
    try:
        from dvclive import Live  # imported late: it is slow to import and only the stages need it
    except ImportError:  # a machine without DVC (docs/gpu.md, `wheelhouse --without-dvc`): no curves, same model
        Live = None
    ckpt, last = out / "checkpoint.pt", out / "last.pt"
    # The kept checkpoint belongs to last.pt's run: if it was trained on other inputs (or is gone), so was last.pt.
    run = run_fingerprint(cfg, fingerprint)
    if ddp.is_main() and last.is_file() and (diff := _checkpoint_differences(ckpt, last, fingerprint, run)):
        log.warning("Setting aside %s and training from scratch, because %s", last, "; ".join(diff))
        last.unlink()
    ddp.barrier()
    save = lambda m, epoch, metric: save_checkpoint(ckpt, m, arch=arch, params=params, epoch=epoch, metric=metric,
                                                    extra={"fingerprint": fingerprint})
    if not ddp.is_main():  # rank 0 writes the curves and the checkpoint
        best = fit(model, train_ds, val_ds, val_labels, loss_fn, cfg, out, None, None, fingerprint)
        model, _ = load_checkpoint(ckpt, resolve_device(cfg.device))
        return best, model
    if Live is None:
        log.warning("dvclive is not installed: %s gets no training curves (pip install dvclive)", out)
        best = fit(model, train_ds, val_ds, val_labels, loss_fn, cfg, out, None, save, fingerprint)
        return best, load_checkpoint(ckpt, resolve_device(cfg.device))[0]
    # Fresh curves every run: fit() replays the epochs it resumes, so the curves always match last.pt.
    with Live(dir=str(out / "live"), resume=False, dvcyaml=None, save_dvc_exp=False) as live:
        best = fit(model, train_ds, val_ds, val_labels, loss_fn, cfg, out, live, save, fingerprint)
        for k, v in best.items():
            live.summary[k] = v
    model, _ = load_checkpoint(ckpt, resolve_device(cfg.device))
    return best, model
