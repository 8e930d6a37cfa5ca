"""`python -m pipeline.tools.bench WHAT`, the benchmarks (not stages). Speed, here: `train` compares training images/s per
precision and input path, `compile` times the training step eager and through torch.compile. Scores
(pipeline.tools.ablations): `plain` trains the simplest competitor, `ablate` one switch, `table` gathers the rows. Errors
(pipeline.tools.error_analysis): `errors` counts, per cell, how many ablation runs got it wrong."""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline.lib import precision as amp_precision
from pipeline.tools.ablations import ablation_table, against, bench_ablate, bench_plain
from pipeline.lib.common import PipelineError, run_main
from pipeline.lib.dataset import CellDataset, load_cache, split_rows, targets
from pipeline.lib.engine import TrainConfig, compiled, resolve_device, setup_device, train_loader, workers
from pipeline.tools.error_analysis import run_errors
from pipeline.lib.images import decode
from pipeline.lib.losses import LabelLoss
from pipeline.lib.models import create_model, data_config
from pipeline.lib.params import load_params, with_overrides
from pipeline.lib.teachers import Teacher
from pipeline.lib.training import derived_seed, for_backbone, train_config
from pipeline.lib.transforms import AugParams, build_transform

log = logging.getLogger(__name__)


class PngDataset(Dataset):
    """The naive baseline: decode and resize the PNG on every access."""

    def __init__(self, paths: list[Path], size: int, transform):
        self.paths, self.size, self.transform = paths, size, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        x = decode(self.paths[i], self.size)[0]  # the cache's own decoding: PNG and JPEG only, bounded
        return self.transform(image=x)["image"], torch.zeros(2)


def images_per_s(model, batches, device, n_batches: int, warmup: int = 2, precision: str = "fp32") -> float:
    """Train steps over `batches` (an iterable of (x, y)) in `precision`; the clock starts after `warmup` batches."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn, seen, start = LabelLoss(), 0, None
    amp, _ = amp_precision.autocast(precision, device)  # the GradScaler's cost is negligible next to a step
    model.train()
    for i, (x, y) in enumerate(batches):
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start, seen = time.perf_counter(), 0
        x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with amp:
            loss = loss_fn(model(x).float(), y.to(device))
        opt.zero_grad()
        loss.backward()
        opt.step()
        seen += len(x)
        if i + 1 == warmup + n_batches:
            break
    if device.type == "cuda":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - start)


def bench_train(prepared: Path, raw: Path, *, backbone: str, cfg: TrainConfig, aug: AugParams, n_batches: int,
                precision_list: list[str] | None = None) -> dict:
    """Training images/s per precision: the bare step on tensors in memory, the pipeline's loader + step, and (fp32)
    a naive loader decoding PNGs; the loader's share of a step is 1 - pipeline / bare."""
    index, images = load_cache(prepared)
    rows = split_rows(index, "train")[: cfg.batch_size * (n_batches + 2)]
    device = resolve_device(cfg.device)
    setup_device(device)
    model = create_model(backbone).to(device).to(memory_format=torch.channels_last)
    tf = build_transform(True, aug, **data_config(model))
    size = images.shape[1]
    x = torch.randn(cfg.batch_size, 3, size, size)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    log.info("%s at %dpx, batch %d, %d loader workers, %s", backbone, size, cfg.batch_size, workers(cfg, device), name)
    results = {}
    for precision in precision_list or amp_precision.native(device):
        bare = images_per_s(model, iter(lambda: (x, torch.zeros(len(x), 2)), None), device, n_batches,
                            precision=precision)
        piped = images_per_s(model, train_loader(CellDataset(images[rows], targets(np.zeros(len(rows))), tf), cfg,
                                                 device), device, n_batches, precision=precision)
        results[precision] = {"bare": bare, "pipeline": piped, "loader_share": max(0.0, 1 - piped / bare)}
        log.info("  %-5s bare step %8.1f images/s, pipeline %8.1f images/s, loader's share %.0f%%", precision, bare,
                 piped, 100 * results[precision]["loader_share"])
    png = PngDataset([raw / p for p in index["path"].iloc[rows]], size, tf)
    results["naive_png_fp32"] = images_per_s(model, train_loader(png, cfg, device), device, n_batches)
    log.info("  naive (decode PNG every epoch), fp32: %8.1f images/s", results["naive_png_fp32"])
    return results


def bench_compile(backbone: str, size: int, *, batch_size: int, device: str, precision: str, n_batches: int) -> dict:
    """Training images/s of the bare step (random tensors) eager and through `engine.compiled` (train.compile: true),
    and the seconds of the compiled model's first step, compiling included."""
    dev = resolve_device(device)
    setup_device(dev)
    batch = lambda: (torch.randn(batch_size, 3, size, size), torch.zeros(batch_size, 2))
    row = {"backbone": backbone, "img_size": size, "batch_size": batch_size, "precision": precision,
           "device": str(dev), "threads": torch.get_num_threads()}
    torch.manual_seed(0)
    net = create_model(backbone).to(dev).to(memory_format=torch.channels_last)
    fast = compiled(net, True, dev)  # lazy: nothing compiles before its first step
    if fast is net:
        raise PipelineError("bench compile: torch.compile is not available here (see the warning above).")
    torch.manual_seed(0)
    eager = create_model(backbone).to(dev).to(memory_format=torch.channels_last)
    row["eager_img_s"] = images_per_s(eager, iter(batch, None), dev, n_batches, precision=precision)
    start = time.perf_counter()
    images_per_s(fast, iter(batch, None), dev, 1, warmup=0, precision=precision)
    row["first_step_s"] = time.perf_counter() - start
    row["compiled_img_s"] = images_per_s(fast, iter(batch, None), dev, n_batches, precision=precision)
    row["ratio"] = row["compiled_img_s"] / row["eager_img_s"]
    log.info("%s at %d px, %s, batch %d: eager %.0f img/s, compiled %.0f img/s (%.2fx), first compiled step %.1f s",
             backbone, size, precision, batch_size, row["eager_img_s"], row["compiled_img_s"], row["ratio"],
             row["first_step_s"])
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("what", choices=["train", "compile", "plain", "ablate", "table", "errors"])
    parser.add_argument("--backbone", help="default: the first of train.backbones")
    parser.add_argument("--batches", type=int, default=10, help="timed batches per path")
    parser.add_argument("--num-workers", help="default: train.num_workers (a number or auto)")
    parser.add_argument("--precision", action="append", choices=["fp32", "bf16", "fp16"],
                        help="train: time this precision (repeatable; default: fp32 and the device's native halves)")
    parser.add_argument("--size", type=int, default=48, help="compile: the image side, px")
    parser.add_argument("--prepared", default="data/prepared", type=Path)
    parser.add_argument("--raw", default="data/raw", type=Path)
    parser.add_argument("--epochs", type=int, help="plain: default train.epochs")
    parser.add_argument("--out", default="data/bench", type=Path, help="plain: scratch folder for its last.pt; "
                        "ablate: the runs go to <out>/ablate/<name>/, their rows to <out>/ablate/ablations.jsonl")
    parser.add_argument("--train-cells", type=int, help="plain: repeat the training cells up to this many (timing "
                        "an epoch of the full data from a sample)")
    parser.add_argument("--folds", default="data/folds.csv", type=Path, help="ablate: the folds CSV")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="ablate: a params.yaml change, as `dvc exp run -S` (repeatable)")
    parser.add_argument("--name", help="ablate: the run's name (default: the --set items)")
    parser.add_argument("--models", help="ablate: the run folder to use (default: the name); another run's, for a "
                        "change that only re-predicts (tta.*)")
    parser.add_argument("--against", type=Path, help="plain, ablate: the reference for a paired test (McNemar) on the "
                        "same test cells: ablate: a row's name (base); either: a bench folder or predictions CSV, or a run's "
                        "submissions/latest/<model>.csv")
    parser.add_argument("--runs", nargs="+", help="errors: the ablation runs to count (default: all)")
    parser.add_argument("--note", default="", help="table: the configuration the rows share (CSV header lines)")
    parser.add_argument("--csv", type=Path, default=Path("notebooks/ablations.csv"), help="table: the CSV to write")
    args = parser.parse_args()
    if args.what == "table":
        log.info("%s", ablation_table(args.out / "ablate" / "ablations.jsonl", args.csv, args.note).to_string(index=False))
        return
    if args.what == "errors":
        table, summary = run_errors(args.prepared, args.out / "ablate", args.runs)
        table.to_csv(args.out / "ablate" / "errors.csv")
        log.info("%s\nPer-cell counts in %s", "\n".join(summary), args.out / "ablate" / "errors.csv")
        return
    params = load_params()
    if args.what == "ablate":
        name = args.name or ("_".join(args.set) or "base").replace("/", "-")
        reference = args.against
        if reference is not None and not reference.exists():  # a row's name: its saved predictions
            reference = args.out / "ablate" / "predictions" / f"{reference}.csv"
            if not reference.is_file():  # said before any training, not after it
                raise PipelineError(f"--against {args.against}: no such file, and no row of that name "
                                    f"({reference} is missing): run `python -m pipeline.tools.bench ablate --name "
                                    f"{args.against}` first.")
        bench_ablate(args.prepared, args.folds, args.out / "ablate" / (args.models or name),
                     with_overrides(params, args.set), name, args.set, reference)
        return
    backbone = args.backbone or params["train"]["backbones"][0]
    t = for_backbone(params, backbone)["train"]
    workers = t["num_workers"] if args.num_workers is None else (
        args.num_workers if args.num_workers == "auto" else int(args.num_workers))
    if args.what == "plain" and args.against is not None and args.against.resolve() == args.out.resolve():
        raise PipelineError(f"--against {args.against} is this run's own --out folder: name another run.")
    if args.what == "plain":
        # The train stage's own seed for this backbone's all-cells model (folds.n 0), so the bar is that model.
        cfg = train_config(t, derived_seed(t["seed"], backbone, "full"), num_workers=workers,
                           **({"epochs": args.epochs} if args.epochs else {}))
        row = bench_plain(args.prepared, args.out, teacher=Teacher.from_params(params, backbone), cfg=cfg,
                          train_cells=args.train_cells)
        row = against(row, args.out, args.against, args.prepared)
        with open(args.out / "plain.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        return
    if args.what == "compile":
        precision = (args.precision or [amp_precision.choose(t["precision"], resolve_device(t["device"]), backbone)])[0]
        row = bench_compile(backbone, args.size, batch_size=t["batch_size"], device=t["device"], precision=precision,
                            n_batches=args.batches)
        args.out.mkdir(parents=True, exist_ok=True)
        with open(args.out / "compile.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        return
    cfg = train_config(t, 0, num_workers=workers)
    bench_train(args.prepared, args.raw, backbone=backbone, cfg=cfg,
                aug=AugParams(**params["augment"]), n_batches=args.batches, precision_list=args.precision)


if __name__ == "__main__":
    run_main(main)
