"""Benchmarks (not stages): `python -m pipeline.bench train` compares training images/s of three input paths;
`python -m pipeline.bench plain` times the simplest competitor, one network on all training cells."""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from pipeline.common import run_main, seed_everything
from pipeline.dataset import CellDataset, load_cache, split_rows, targets
from pipeline.engine import TrainConfig, fit, loader, predict, resolve_device, setup_device
from pipeline.losses import LabelLoss
from pipeline.metrics import binary_metrics
from pipeline.models import create_model, data_config
from pipeline.params import load_params
from pipeline.transforms import AugParams, build_transform
from pipeline.workflow import train_config

log = logging.getLogger(__name__)


class PngDataset(Dataset):
    """The naive baseline: decode and resize the PNG on every access."""

    def __init__(self, paths: list[Path], size: int, transform):
        self.paths, self.size, self.transform = paths, size, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        with Image.open(self.paths[i]) as im:
            x = np.asarray(im.convert("RGB").resize((self.size, self.size), Image.Resampling.BILINEAR))
        return self.transform(image=x)["image"], torch.zeros(2)


def images_per_s(model, batches, device, n_batches: int, warmup: int = 2) -> float:
    """Train steps over `batches` (an iterable of (x, y)); the clock starts after `warmup` batches."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn, seen, start = LabelLoss(), 0, None
    model.train()
    for i, (x, y) in enumerate(batches):
        if i == warmup:
            start, seen = time.perf_counter(), 0
        x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        loss = loss_fn(model(x), y.to(device))
        opt.zero_grad()
        loss.backward()
        opt.step()
        seen += len(x)
        if i + 1 == warmup + n_batches:
            break
    if device.type == "cuda":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - start)


def bench_train(prepared: Path, raw: Path, *, backbone: str, cfg: TrainConfig, aug: AugParams, n_batches: int) -> dict:
    index, images = load_cache(prepared)
    rows = split_rows(index, "train")[: cfg.batch_size * (n_batches + 2)]
    device = resolve_device(cfg.device)
    setup_device(device)
    model = create_model(backbone).to(device).to(memory_format=torch.channels_last)
    tf = build_transform(True, aug, **data_config(model))
    size = images.shape[1]
    x = torch.randn(cfg.batch_size, 3, size, size)
    results = {
        "bare model step (tensors in memory)": images_per_s(model, iter(lambda: (x, torch.zeros(len(x), 2)), None),
                                                            device, n_batches),
        "pipeline (uint8 cache + augment in workers)": images_per_s(
            model, loader(CellDataset(images[rows], targets(np.zeros(len(rows))), tf), cfg, device, shuffle=True),
            device, n_batches),
        "naive (decode PNG every epoch)": images_per_s(
            model, loader(PngDataset([raw / p for p in index["path"].iloc[rows]], size, tf), cfg, device, shuffle=True),
            device, n_batches),
    }
    print(f"{backbone} at {size}px, batch {cfg.batch_size}, {cfg.num_workers} workers, {device}, "
          f"{torch.get_num_threads()} threads")
    for name, v in results.items():
        print(f"  {name:<46} {v:8.1f} images/s")
    return results


def bench_plain(prepared: Path, out: Path, *, backbone: str, cfg: TrainConfig, aug: AugParams, drop_rate: float
                ) -> dict:
    """The bar every piece of machinery must clear: one network trained on all training cells with the pipeline's
    own loop (no folds, no TTA, the last epoch kept), scored on the labelled test set."""
    index, images = load_cache(prepared)
    tr, te = split_rows(index, "train"), split_rows(index, "test")
    labels = index["label"].to_numpy(dtype=float)
    start = time.perf_counter()
    seed_everything(cfg.seed)
    model = create_model(backbone, drop_rate=drop_rate)
    norm = data_config(model)
    train_ds = CellDataset(images[tr], targets(labels[tr]), build_transform(True, aug, **norm), seed=cfg.seed)
    out.mkdir(parents=True, exist_ok=True)
    (out / "last.pt").unlink(missing_ok=True)  # a benchmark always trains from scratch
    fit(model, train_ds, None, None, LabelLoss(cfg.label_smoothing), cfg, out)
    test_ds = CellDataset(images[te], targets(labels[te]), build_transform(False, aug, **norm))
    p = predict(model, test_ds, cfg, resolve_device(cfg.device))[:, 0]
    m = binary_metrics(labels[te].astype(int), p)
    se = (m["accuracy"] * (1 - m["accuracy"]) / len(te)) ** 0.5
    result = {"backbone": backbone, "epochs": cfg.epochs, "train_images": len(tr), "test_images": len(te),
              "test_accuracy": m["accuracy"], "test_accuracy_se": se, "test_roc_auc": m["roc_auc"],
              "minutes": (time.perf_counter() - start) / 60}
    print(f"plain {backbone}, {cfg.epochs} epochs on {len(tr)} cells at {images.shape[1]} px: test accuracy "
          f"{m['accuracy']:.4f} ± {se:.4f} (AUC {m['roc_auc']:.4f}) on {len(te)} cells in {result['minutes']:.2f} min")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("what", choices=["train", "plain"])
    parser.add_argument("--backbone", help="default: the first of train.backbones")
    parser.add_argument("--batches", type=int, default=10, help="timed batches per path")
    parser.add_argument("--num-workers", type=int, help="default: train.num_workers")
    parser.add_argument("--prepared", default="data/prepared", type=Path)
    parser.add_argument("--raw", default="data/raw", type=Path)
    parser.add_argument("--epochs", type=int, help="plain: default train.epochs")
    parser.add_argument("--out", default="data/bench", type=Path, help="plain: scratch folder for its last.pt")
    args = parser.parse_args()
    params = load_params()
    t = params["train"]
    workers = t["num_workers"] if args.num_workers is None else args.num_workers
    if args.what == "plain":
        cfg = train_config(t, t["seed"], num_workers=workers, select_best=False,
                           **({"epochs": args.epochs} if args.epochs else {}))
        bench_plain(args.prepared, args.out, backbone=args.backbone or t["backbones"][0], cfg=cfg,
                    aug=AugParams(**params["augment"]), drop_rate=t["drop_rate"])
        return
    cfg = TrainConfig(batch_size=t["batch_size"], num_workers=workers, device=t["device"])
    bench_train(args.prepared, args.raw, backbone=args.backbone or t["backbones"][0], cfg=cfg,
                aug=AugParams(**params["augment"]), n_batches=args.batches)


if __name__ == "__main__":
    run_main(main)
