"""The GPU check's model-level sections (environment, fit, predictions, views, resume, export) and what every
section shares; each is `fn(check) -> details`."""
from __future__ import annotations

import importlib.util
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.lib.cards import cards
from pipeline.lib.precision import native


class SectionTimeout(Exception):
    """A section ran past its cap."""


class Skip(Exception):
    """A section that does not apply here (the reason is its message)."""


@dataclass
class Check:
    """What the sections share: the device, the output folder, the demo cells and what earlier sections made."""
    device: object
    out: Path
    images: np.ndarray = None
    labels: np.ndarray = None
    made: dict = field(default_factory=dict)
    asked: tuple = ()  # the sections named with --only
    partial: dict = field(default_factory=dict)  # what a long section measured so far, reported if it is cut short

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def split(self) -> tuple[np.ndarray, np.ndarray]:
        """Training and validation rows: every fifth cell validates."""
        rows = np.arange(len(self.images))
        return rows[rows % 5 != 0], rows[rows % 5 == 0]


REPO = Path(__file__).resolve().parents[2]
SIZE, BACKBONE = 64, "resnet10t"
# Killed+resumed against unbroken, max |Δprob|: bitwise on the CPU; on a GPU cuDNN's autotuning may pick other
# kernels in each run, so runs are not bitwise repeatable there and the bound is loose.
RESUME_TOLERANCE = {"cpu": 1e-5, "cuda": 0.02}
PACKAGES = ("albumentations", "pydantic", "dvc", "dvclive", "kaggle", "cleanlab", "nbclient", "weasyprint",
            "onnxruntime")


def environment(check: Check) -> dict:
    from pipeline.lib.engine import cores
    from pipeline.lib.precision import choose

    d = {"torch": torch.__version__, "python": platform.python_version(), "cores (affinity)": cores(),
         "missing packages": [p for p in PACKAGES if importlib.util.find_spec(p) is None] or "none"}
    if os.path.isdir("/dev/shm"):
        d["/dev/shm GB"] = round(shutil.disk_usage("/dev/shm").total / 2**30, 1)
    if check.cuda:
        cap = torch.cuda.get_device_capability(check.device)
        d.update({"card": torch.cuda.get_device_name(check.device), "capability": "%d.%d" % cap,
                  "memory GB": round(torch.cuda.get_device_properties(check.device).total_memory / 2**30, 1),
                  "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
                  "gpus": torch.cuda.device_count(),
                  "arch in torch's list": f"sm_{cap[0]}{cap[1]}" in torch.cuda.get_arch_list()})
        # The pipeline's own check before training (pipeline.lib.cards): tiny ops on every visible card.
        rows = cards()
        d["cards run an op"] = "; ".join(f"{r['card']} {r['name']} ({r['capability']}): {r['error'] or 'ok'}"
                                         for r in rows)
        if any(r["error"] for r in rows):
            d["failed"] = True
    else:
        flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
        d["cpu flags"] = " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f" {f}" in flags)
    d["auto precision"] = {a: choose("auto", check.device, a) for a in (BACKBONE, "efficientnet_b0")}
    return d


class Recorder:
    """fit()'s `live`: keeps each epoch's metrics; `kill_after` raises after that epoch's last.pt is written, as a
    kill would; `on_epoch` runs after each epoch (last.pt then holds the full state of an unfinished run)."""

    def __init__(self, kill_after: int | None = None, on_epoch=None):
        self.rows, self.row, self.kill_after, self.on_epoch = [], {}, kill_after, on_epoch

    def log_metric(self, k, v):
        self.row[k] = v

    def next_step(self):
        self.rows.append(self.row)
        self.row = {}
        if self.on_epoch:
            self.on_epoch(len(self.rows))
        if self.kill_after == len(self.rows):
            raise KeyboardInterrupt("killed by the check")


def train(check: Check, out: Path, precision: str, live: Recorder, **options) -> tuple[torch.nn.Module, dict]:
    """The pipeline's own fit() of the check's backbone for 2 epochs; returns the model and what was seen."""
    from pipeline.lib.checkpoints import save_checkpoint
    from pipeline.lib.dataset import CellDataset, targets
    from pipeline.lib.engine import TrainConfig, fit
    from pipeline.lib.losses import LabelLoss
    from pipeline.lib.models import create_model, data_config
    from pipeline.lib.transforms import AugParams, build_transform

    torch.manual_seed(0)
    model = create_model(BACKBONE, drop_rate=0.1)
    norm, aug = data_config(model), AugParams(affine=0, color=0, blur=0, noise=0, dropout=0)
    tr, va = check.split()
    cfg = TrainConfig(**{**dict(epochs=2, batch_size=64, lr=0.003, weight_decay=0.05, warmup_epochs=1.0,
                                label_smoothing=0.05, grad_clip=1.0, ema_decay=0.0, patience=5, seed=1,
                                num_workers="auto", device=check.device.type, precision=precision, mixup=0.0,
                                cutmix=0.0, progressive=1.0, sync_bn=False, compile="auto"), **options})
    seen = {}

    def probe(module, inputs) -> None:  # the first training batch as the model gets it
        if "input" not in seen:
            seen["input"] = (inputs[0].device.type, inputs[0].is_contiguous(memory_format=torch.channels_last))

    hook = model.register_forward_pre_hook(probe)
    save = lambda m, epoch, metric: save_checkpoint(out / "checkpoint.pt", m, arch=BACKBONE, epoch=epoch,
                                                    metric=metric, params={"img_size": SIZE})
    out.mkdir(parents=True, exist_ok=True)
    fit(model, CellDataset(check.images[tr], targets(check.labels[tr]), build_transform(True, aug, **norm), seed=1),
        CellDataset(check.images[va], targets(check.labels[va]), build_transform(False, aug, **norm)),
        check.labels[va], LabelLoss(0.05), cfg, out, live=live, save=save)
    hook.remove()
    return model, seen


def fit_runs(check: Check) -> dict:
    from pipeline.lib.checkpoints import read_checkpoint

    d, failed = {}, False
    runs = [("auto", {}), ("fp16", dict(ema_decay=0.9, mixup=0.2, progressive=0.5))]
    for precision, options in runs:
        if precision == "fp16" and not check.cuda:
            d["fp16+ema+mixup+progressive"] = "skipped: fp16 needs CUDA"
            continue
        out = check.out / f"fit_{precision}"
        shutil.rmtree(out, ignore_errors=True)
        scaler = {}

        def after(epoch: int, out=out, scaler=scaler) -> None:  # after epoch 1 of 2, last.pt holds the whole state
            if epoch == 1:
                scaler["scale"] = (read_checkpoint(out / "last.pt").get("scaler") or {}).get("scale")

        rec = Recorder(on_epoch=after)
        t0 = time.perf_counter()
        model, seen = train(check, out, precision, rec, **options)
        weight = next(p for p in model.parameters() if p.dim() == 4)
        losses = [r["train_loss"] for r in rec.rows]
        row = {"train_loss": [round(x, 4) for x in losses], "val_accuracy": round(rec.rows[-1]["val_accuracy"], 3),
               "images/s": round(rec.rows[-1]["images_per_s"]), "seconds": round(time.perf_counter() - t0, 1),
               "weights on": weight.device.type, "weights channels_last":
               weight.is_contiguous(memory_format=torch.channels_last), "inputs (device, channels_last)": seen["input"]}
        if precision == "fp16":
            row["scaler scale saved in last.pt"] = scaler.get("scale")
            failed |= not scaler.get("scale")
        failed |= not all(np.isfinite(losses)) or weight.device.type != check.device.type or not seen["input"][1]
        d["auto" if precision == "auto" else "fp16+ema+mixup+progressive"] = row
        check.made[f"fit_{precision}"] = out
    return {**d, "failed": failed}


def _probs(model, x: np.ndarray, device, precision: str) -> np.ndarray:
    from pipeline.lib.precision import autocast

    amp, _ = autocast(precision, device)
    model = model.to(device).to(memory_format=torch.channels_last).eval()
    with torch.no_grad(), amp:
        t = torch.from_numpy(x).to(device).contiguous(memory_format=torch.channels_last)
        return F.softmax(model(t).float(), 1)[:, 1].cpu().numpy()


def _val_inputs(check: Check, ck: dict) -> np.ndarray:
    from pipeline.lib.images import normalize

    return normalize(check.images[check.split()[1]], ck["data_config"]["mean"], ck["data_config"]["std"])


def predictions(check: Check) -> dict:
    from pipeline.lib.checkpoints import load_checkpoint

    if "fit_auto" not in check.made:
        raise Skip("needs the fit section's checkpoint")
    model, ck = load_checkpoint(check.made["fit_auto"] / "checkpoint.pt")
    x = _val_inputs(check, ck)
    ref = _probs(model, x, torch.device("cpu"), "fp32")
    d, failed = {}, False
    for precision in native(check.device):
        p = _probs(model, x, check.device, precision)
        nan = int(np.isnan(p).sum())
        d[precision] = {"max |Δ|": float(np.abs(p - ref).max()), "mean |Δ|": float(np.abs(p - ref).mean()), "NaN": nan}
        failed |= nan > 0 or d[precision]["max |Δ|"] > 0.05
    return {**d, "failed": failed}


def views_and_batch_aug(check: Check) -> dict:
    from pipeline.lib import batch_aug
    from pipeline.lib.tta import apply_view
    from pipeline.lib.views import CROPS, D4, GROUPS

    x = torch.randn(8, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    views = D4 + CROPS + GROUPS["ten_crop"][5:] + ["scale_88", "scale_112"]
    other, what = ((lambda t: t.to(check.device), "device") if check.device.type != "cpu" else
                   (lambda t: t.numpy(), "numpy (the ONNX path)"))
    back = lambda t: t.cpu() if isinstance(t, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(t))
    dv = {v: float((apply_view(x, v) - back(apply_view(other(x), v))).abs().max()) for v in views}
    d = {f"views, CPU torch vs {what}: max |Δ|": max(dv.values()), "worst view": max(dv, key=dv.get)}
    if check.device.type != "cpu":
        y = torch.rand(8, 2)
        for name, (mixup, cutmix) in {"mixup": (0.2, 0.0), "cutmix": (0.0, 1.0)}.items():
            a = batch_aug.mix(x, y, mixup, cutmix, np.random.default_rng(0))
            b = batch_aug.mix(x.to(check.device), y.to(check.device), mixup, cutmix, np.random.default_rng(0))
            d[f"{name} max |Δ|"] = max(float((u - v.cpu()).abs().max()) for u, v in zip(a, b))
        d["resize 64→32 max |Δ|"] = float((batch_aug.resize(x, 32) - batch_aug.resize(x.to(check.device), 32).cpu())
                                           .abs().max())
    return {**d, "failed": max(v for k, v in d.items() if "max" in k) > 1e-4}


def resume(check: Check) -> dict:
    from pipeline.lib.checkpoints import load_checkpoint, read_checkpoint

    if "fit_auto" not in check.made:
        raise Skip("needs the fit section's unbroken run")
    out = check.out / "resume"
    shutil.rmtree(out, ignore_errors=True)
    try:
        train(check, out, "auto", Recorder(kill_after=1))
    except KeyboardInterrupt:
        pass
    partial = read_checkpoint(out / "last.pt")
    rec = Recorder()
    train(check, out, "auto", rec)
    x = _val_inputs(check, load_checkpoint(out / "checkpoint.pt")[1])
    a, b = (_probs(load_checkpoint(d / "checkpoint.pt")[0], x, torch.device("cpu"), "fp32")
            for d in (check.made["fit_auto"], out))
    tol = RESUME_TOLERANCE["cpu" if check.device.type == "cpu" else "cuda"]
    delta = float(np.abs(a - b).max())
    return {"killed after epoch": partial["state"]["epoch"], "epochs replayed": len(rec.rows),
            "max |Δprob| vs unbroken": delta, "tolerance": tol, "failed": delta > tol}


def export(check: Check) -> dict:
    from pipeline.lib import onnx_io
    from pipeline.lib.onnx_export import PARITY_TOLERANCE, to_onnx
    from pipeline.lib.checkpoints import load_checkpoint

    if "fit_auto" not in check.made:
        raise Skip("needs the fit section's checkpoint")
    model, ck = load_checkpoint(check.made["fit_auto"] / "checkpoint.pt")
    path = check.out / "student.onnx"
    to_onnx(model, SIZE, path)
    x = _val_inputs(check, ck)
    delta = float(np.abs(onnx_io.predict(onnx_io.session(path), x) - _probs(model, x, torch.device("cpu"), "fp32")).max())
    return {"trained on": check.device.type, "onnx vs torch fp32 max |Δprob|": delta, "tolerance": PARITY_TOLERANCE,
            "failed": delta > PARITY_TOLERANCE}
