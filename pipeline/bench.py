"""Benchmarks (not stages): `train` compares training images/s per precision and input path; `compile` times the
training step eager and through torch.compile; `plain` times the simplest competitor, one network on all training
cells; `ablate` measures one switch (CV, test, minutes); `errors` counts, per cell, how many ablation runs got it
wrong (the cells every run misses bound what any of them can score)."""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import Dataset

from pipeline.common import PipelineError, run_main, seed_everything
from pipeline.dataset import CellDataset, load_cache, split_rows, targets
from pipeline import precision as amp_precision
from pipeline.engine import (TrainConfig, compiled, fit, predict, resolve_device, setup_device, train_loader,
                             workers)
from pipeline.losses import LabelLoss
from pipeline.compare import labels_by_name, paired, summary
from pipeline.metrics import accuracy_se, binary_metrics
from pipeline.models import create_model, data_config
from pipeline.params import load_params, with_overrides
from pipeline.transforms import AugParams, build_transform
from pipeline.workflow import derived_seed, for_backbone, train_config

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


def precisions(device: torch.device) -> list[str]:
    """The precisions worth timing here: fp32, and the half precisions this device has natively."""
    if device.type == "cuda":
        return ["fp32", "fp16"] + (["bf16"] if torch.cuda.get_device_capability(device) >= (8, 0) else [])
    return ["fp32"] + (["bf16"] if amp_precision.cpu_has_native_bf16() else [])


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
    print(f"{backbone} at {size}px, batch {cfg.batch_size}, {workers(cfg, device)} loader workers, {name}")
    results = {}
    for precision in precision_list or precisions(device):
        bare = images_per_s(model, iter(lambda: (x, torch.zeros(len(x), 2)), None), device, n_batches,
                            precision=precision)
        piped = images_per_s(model, train_loader(CellDataset(images[rows], targets(np.zeros(len(rows))), tf), cfg,
                                                 device), device, n_batches, precision=precision)
        results[precision] = {"bare": bare, "pipeline": piped, "loader_share": max(0.0, 1 - piped / bare)}
        print(f"  {precision:<5} bare step {bare:8.1f} images/s, pipeline {piped:8.1f} images/s, loader's share "
              f"{results[precision]['loader_share']:.0%}")
    png = PngDataset([raw / p for p in index["path"].iloc[rows]], size, tf)
    results["naive_png_fp32"] = images_per_s(model, train_loader(png, cfg, device), device, n_batches)
    print(f"  naive (decode PNG every epoch), fp32: {results['naive_png_fp32']:8.1f} images/s")
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


def bench_plain(prepared: Path, out: Path, *, backbone: str, cfg: TrainConfig, aug: AugParams, drop_rate: float,
                pretrained: bool = False, weights_dir: Path | None = None, train_cells: int | None = None) -> dict:
    """The bar every piece of machinery must clear: one network trained on all training cells with the pipeline's
    own loop (no folds, no TTA, the last epoch kept), scored on the labelled test set. `train_cells`: repeat the
    training cells up to that many, to time an epoch of a bigger data set (its score then means nothing new)."""
    index, images = load_cache(prepared)
    tr, te = split_rows(index, "train"), split_rows(index, "test")
    if train_cells:
        tr = np.resize(tr, train_cells)  # cyclic repeat of the training rows
    labels = index["label"].to_numpy(dtype=float)
    start = time.perf_counter()
    seed_everything(cfg.seed)
    model = create_model(backbone, drop_rate=drop_rate, pretrained=pretrained, weights_dir=weights_dir)
    norm = data_config(model)
    train_ds = CellDataset(images[tr], targets(labels[tr]), build_transform(True, aug, **norm), seed=cfg.seed)
    out.mkdir(parents=True, exist_ok=True)
    (out / "last.pt").unlink(missing_ok=True)  # a benchmark always trains from scratch
    fit(model, train_ds, None, None, LabelLoss(cfg.label_smoothing), cfg, out)
    test_ds = CellDataset(images[te], targets(labels[te]), build_transform(False, aug, **norm))
    p = predict(model, test_ds, cfg, resolve_device(cfg.device))[:, 0]
    m = binary_metrics(labels[te].astype(int), p)
    se = accuracy_se(m["accuracy"], len(te))
    result = {"backbone": backbone, "pretrained": pretrained, "img_size": int(images.shape[1]), "epochs": cfg.epochs,
              "seed": cfg.seed, "train_images": len(tr), "test_images": len(te),
              "test_accuracy": m["accuracy"], "test_accuracy_se": se, "test_roc_auc": m["roc_auc"],
              "minutes": (time.perf_counter() - start) / 60}
    # Per-cell, for paired tests against other runs (python -m pipeline.compare).
    pd.DataFrame({"img_name": index["img_name"].to_numpy()[te], "prob": p}).to_csv(out / "test.csv", index=False,
                                                                                   float_format="%.6f")
    print(f"plain {backbone}, {cfg.epochs} epochs on {len(tr)} cells at {images.shape[1]} px: test accuracy "
          f"{m['accuracy']:.4f} ± {se:.4f} (AUC {m['roc_auc']:.4f}) on {len(te)} cells in {result['minutes']:.2f} min")
    return result


def against(row: dict, run: Path, reference: Path | None, prepared: Path) -> dict:
    """Add the paired test of `run` against `reference` (a bench folder or a run's submission file) to `row`."""
    if reference is None:
        return row
    r = paired(run, reference, prepared)
    row.update(reference=str(reference), reference_accuracy=r["b"]["accuracy"], only_this=r["only_a"],
               only_reference=r["only_b"], mcnemar_p=r["mcnemar_p"])
    print(summary(r))
    return row


def bench_ablate(prepared: Path, folds_csv: Path, out: Path, params: dict, name: str, sets: list[str],
                 reference: Path | None = None) -> dict:
    """One ablation row: the first of train.backbones on every fold of folds_csv with these params (the train stage's
    own train_fold and seeds; finished folds are reused, so a TTA-only change only re-predicts): OOF accuracy and
    AUC, the fold-averaged labelled-test accuracy (± binomial SE) and AUC with the configured TTA, minutes, and the
    paired test against `reference` (the base row's run folder, say)."""
    from pipeline.train import model_kwargs, train_fold  # a benchmark, not a stage: it may drive the train stage's code

    backbone = params["train"]["backbones"][0]
    params = for_backbone(params, backbone)
    p = params["train"]
    index, _ = load_cache(prepared)
    label = labels_by_name(index)
    start = time.perf_counter()
    for k in sorted(pd.read_csv(folds_csv)["fold"].unique()):
        train_fold(prepared, folds_csv, out / f"fold{k}", fold=int(k), cfg=train_config(p, derived_seed(
            p["seed"], backbone, int(k))), **model_kwargs(params, backbone))
    minutes = (time.perf_counter() - start) / 60
    read = lambda f: pd.read_csv(f, dtype={"img_name": str})
    oof = pd.concat(read(f) for f in sorted(out.glob("fold*/oof.csv")))
    tests = [read(f) for f in sorted(out.glob("fold*/test.csv"))]
    test_prob = np.mean([t["prob_tta"].to_numpy() for t in tests], 0)
    cv = binary_metrics(label[oof["img_name"]].to_numpy(int), oof["prob_tta"].to_numpy())
    test = binary_metrics(label[tests[0]["img_name"]].to_numpy(int), test_prob)
    predictions = out.parent / "predictions" / f"{name}.csv"  # this row's own: a TTA-only row shares the run folder
    predictions.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"img_name": tests[0]["img_name"], "prob": test_prob}).to_csv(predictions, index=False,
                                                                               float_format="%.6f")
    row = {"name": name, "set": sets, "backbone": backbone, "seed": p["seed"], "cv_accuracy": cv["accuracy"],
           "cv_accuracy_se": accuracy_se(cv["accuracy"], len(oof)), "cv_roc_auc": cv["roc_auc"],
           "test_accuracy": test["accuracy"],
           "test_accuracy_se": accuracy_se(test["accuracy"], len(test_prob)), "test_roc_auc": test["roc_auc"],
           "minutes": minutes}
    row = against(row, predictions, reference, prepared)
    with open(out.parent / "ablations.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    print(f"| {name} | {' '.join(sets) or '(base)'} | {cv['accuracy']:.3f} ± {row['cv_accuracy_se']:.3f} "
          f"({cv['roc_auc']:.3f}) | {test['accuracy']:.3f} ± {row['test_accuracy_se']:.3f} ({test['roc_auc']:.3f}) "
          f"| {minutes:.1f} |")
    return row


def run_errors(prepared: Path, ablate_dir: Path, runs: list[str] | None = None) -> tuple[pd.DataFrame, list[str]]:
    """Per training (out-of-fold) and labelled-test cell: in how many of the ablation runs (all under ablate_dir, or
    `runs`) it was wrong at 0.5, each run's test call its folds' mean probability; and one summary line per split.
    The single-view `prob` is read: a TTA-only row (--models) rewrites a run's `prob_tta`, never its `prob`."""
    index, _ = load_cache(prepared)
    label = labels_by_name(index)
    read = lambda f: pd.read_csv(f, dtype={"img_name": str}).drop_duplicates("img_name").set_index("img_name")["prob"]
    names = runs or sorted(d.name for d in ablate_dir.iterdir() if list(d.glob("fold*/test.csv")))
    wrong = {}
    for name in names:
        d = ablate_dir / name
        if not list(d.glob("fold*/oof.csv")) or not list(d.glob("fold*/test.csv")):
            raise PipelineError(f"{d} holds no finished fold (fold*/oof.csv and test.csv): run `python -m pipeline.bench "
                                f"ablate --name {name}` first, or leave it out of --runs.")
        oof = pd.concat(read(f) for f in sorted(d.glob("fold*/oof.csv")))
        test = pd.concat([read(f) for f in sorted(d.glob("fold*/test.csv"))], axis=1).mean(axis=1)
        wrong[name] = pd.concat([(p >= 0.5) != (label[p.index] == 1) for p in (oof, test)],
                                keys=["cv", "test"], names=["split", "img_name"])
    table = pd.DataFrame(wrong)  # a run whose folds.csv left a cell out did not score it: NaN, not counted
    out = pd.DataFrame({"label": label[table.index.get_level_values("img_name")].to_numpy(),
                        "runs_wrong": table.sum(axis=1).astype(int), "runs": table.notna().sum(axis=1)},
                       index=table.index)
    summary = []
    for split, rows in out.groupby(level="split"):
        always = int((rows["runs_wrong"] == len(names)).sum())
        summary.append(f"{split}: {always} of {len(rows)} cells wrong in all {len(names)} runs "
                       f"({int((rows['runs_wrong'] > 0).sum())} in at least one): each of these runs, and their mean, "
                       f"scores at most {(len(rows) - always) / len(rows):.3f} here")
    return out.sort_values("runs_wrong", ascending=False), summary


def ablation_table(rows_jsonl: Path, out_csv: Path, note: str) -> pd.DataFrame:
    """The ablation rows (the last of each name) as the CSV the report shows, `note` (the shared configuration and the
    machine) in its # header lines."""
    rows = [json.loads(line) for line in rows_jsonl.read_text().splitlines() if line.strip()]
    table = pd.DataFrame(list({r["name"]: r for r in rows}.values()))
    table["set"] = table["set"].map(lambda s: " ".join(s) or "(the base configuration)")
    cols = ["name", "set", "seed", "cv_accuracy", "cv_accuracy_se", "cv_roc_auc", "test_accuracy", "test_accuracy_se",
            "test_roc_auc", "minutes"]
    header = "".join(f"# {line}\n" for line in note.splitlines())
    out_csv.write_text(header + table[cols].to_csv(index=False, float_format="%.4f"))
    return table[cols]


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
        print(ablation_table(args.out / "ablate" / "ablations.jsonl", args.csv, args.note).to_string(index=False))
        return
    if args.what == "errors":
        table, summary = run_errors(args.prepared, args.out / "ablate", args.runs)
        table.to_csv(args.out / "ablate" / "errors.csv")
        print("\n".join(summary) + f"\nPer-cell counts in {args.out / 'ablate' / 'errors.csv'}")
        return
    params = load_params()
    if args.what == "ablate":
        name = args.name or ("_".join(args.set) or "base").replace("/", "-")
        reference = args.against
        if reference is not None and not reference.exists():  # a row's name: its saved predictions
            reference = args.out / "ablate" / "predictions" / f"{reference}.csv"
            if not reference.is_file():  # said before any training, not after it
                raise PipelineError(f"--against {args.against}: no such file, and no row of that name "
                                    f"({reference} is missing): run `python -m pipeline.bench ablate --name "
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
        cfg = train_config(t, t["seed"], num_workers=workers, select_best=False,
                           **({"epochs": args.epochs} if args.epochs else {}))
        row = bench_plain(args.prepared, args.out, backbone=backbone, cfg=cfg,
                          aug=AugParams(**params["augment"]), drop_rate=t["drop_rate"], pretrained=t["pretrained"],
                          weights_dir=Path(t["weights_dir"]), train_cells=args.train_cells)
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
    cfg = TrainConfig(batch_size=t["batch_size"], num_workers=workers, device=t["device"])
    bench_train(args.prepared, args.raw, backbone=backbone, cfg=cfg,
                aug=AugParams(**params["augment"]), n_batches=args.batches, precision_list=args.precision)


if __name__ == "__main__":
    run_main(main)
