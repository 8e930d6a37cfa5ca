"""Stage `export`: the student as ONNX (fp32, and static int8 calibrated on training cells), checked against torch
on the labelled test cells and timed."""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from pipeline.lib import onnx_io
from pipeline.lib.onnx_export import PARITY_TOLERANCE, to_onnx
from pipeline.lib.checkpoints import load_checkpoint
from pipeline.lib.common import (PipelineError, available_cores, git_commit, labelled_test_seen, run_main, write_text_whole,
                             written_whole)
from pipeline.lib.dataset import load_cache, split_rows
from pipeline.lib.engine import InferConfig, predict
from pipeline.lib.images import normalize
from pipeline.lib.metrics import binary_metrics
from pipeline.lib.params import load_params
from pipeline.lib.predictions import eval_dataset
from pipeline.lib.tta import TTASpec

log = logging.getLogger(__name__)
for _name in ("onnx_ir", "onnxscript", "onnxruntime"):  # a line per graph pass otherwise
    logging.getLogger(_name).setLevel(logging.WARNING)

THRESHOLD = 0.5           # the student's decision threshold, as the submit stage applies it
INT8_TOLERANCE_PP, INT8_MIN_IMAGES = 0.5, 600  # int8 is kept within 0.5 pp of fp32, judged on >= 600 cells
CALIBRATION_IMAGES = 256


def to_int8(fp32: Path, path: Path, calibration: np.ndarray) -> None:
    """Static int8 (QDQ, per-channel weights) calibrated on `calibration`, after ONNX Runtime's pre-processing;
    dynamic quantization would make slow ConvInteger nodes."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(np.array_split(calibration, max(1, len(calibration) // 64)))

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {"image": np.ascontiguousarray(batch)}

    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(fp32), str(pre))
        with written_whole(path) as out:
            quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)


def batched_ms(run: Callable[[np.ndarray], object], x: np.ndarray, batch: int) -> float:
    """Wall time per image of `run` over `x` in batches of `batch`, after one warm-up batch."""
    run(x[:batch])
    start = time.perf_counter()
    for i in range(0, len(x), batch):
        run(x[i:i + batch])
    return round(1000 * (time.perf_counter() - start) / len(x), 4)


def timings(model: torch.nn.Module, onnx_files: dict[str, Path], x: np.ndarray) -> dict[str, dict]:
    """ms per image at batch 1 and 64, with 1 thread and with every core, for torch and each ONNX file."""
    cores, saved = available_cores(), torch.get_num_threads()
    out = {name: {} for name in ("torch_fp32", *onnx_files)}
    for threads, tag in ((1, "threads1"), (cores, "threads_all")):
        torch.set_num_threads(threads)
        sessions = {name: onnx_io.session(f, threads) for name, f in onnx_files.items()}
        with torch.inference_mode():
            runners = {"torch_fp32": lambda b: model(torch.from_numpy(b)),
                       **{n: (lambda b, s=s: s.run(None, {"image": b})) for n, s in sessions.items()}}
            for name, run in runners.items():
                out[name][f"batch1_{tag}"] = batched_ms(run, x[:32], 1)
                out[name][f"batch64_{tag}"] = batched_ms(run, x[:128], 64)
    torch.set_num_threads(saved)
    return out


def export(prepared: Path, student: Path, out: Path, *, tta: TTASpec) -> dict:
    """Write student.onnx, student.int8.onnx, model.json, scores.json and metrics.json into `out`."""
    seconds, t0 = {}, time.perf_counter()
    model, ck = load_checkpoint(student / "checkpoint.pt")
    size, norm = int(ck["params"]["img_size"]), ck["data_config"]
    index, images = load_cache(prepared)
    if images.shape[1] != size:
        raise PipelineError(f"{prepared / 'images.npy'} holds {images.shape[1]} px images but the student was trained "
                            f"at {size} px; re-run `dvc repro` so the student matches the cache.")
    test = split_rows(index, "test")
    y = index["label"].to_numpy()[test].astype(int)
    x = normalize(images[test], norm["mean"], norm["std"])
    # The reference: the pipeline's own prediction function on the cache, in fp32 on the CPU.
    reference = predict(model, eval_dataset(images[test], norm), InferConfig(device="cpu"), torch.device("cpu"),
                        desc="torch")[:, 0]
    out.parent.mkdir(parents=True, exist_ok=True)
    # The five files replace the old ones as one set (a folder swapped in, as prepare does): a kill or a failed
    # check never leaves new models beside an old model.json, which `predict` trusts.
    with written_whole(out) as folder:
        folder.mkdir()
        files = {"onnx_fp32": folder / "student.onnx", "onnx_int8": folder / "student.int8.onnx"}
        to_onnx(model, size, files["onnx_fp32"])
        seconds["export"] = round(time.perf_counter() - t0, 2)
        train = split_rows(index, "train")
        calib = np.random.default_rng(0).choice(train, min(CALIBRATION_IMAGES, len(train)), replace=False)
        t1 = time.perf_counter()
        to_int8(files["onnx_fp32"], files["onnx_int8"], normalize(images[np.sort(calib)], norm["mean"], norm["std"]))
        seconds["quantize"] = round(time.perf_counter() - t1, 2)

        formats = {"torch_fp32": {"file": str(student / "checkpoint.pt"), "prob": reference}}
        for name, f in files.items():
            formats[name] = {"file": str(f), "prob": onnx_io.predict(onnx_io.session(f), x)}
        for name, r in formats.items():
            p = r.pop("prob")
            r.update(size_mb=round(Path(r["file"]).stat().st_size / 1e6, 2), max_abs_dprob=float(np.abs(p - reference).max()),
                     **{k: binary_metrics(y, p, THRESHOLD)[k] for k in ("accuracy", "roc_auc")})
        for name, f in files.items():  # where they will be, not where they are written
            formats[name]["file"] = str(out / f.name)
        if formats["onnx_fp32"]["max_abs_dprob"] > PARITY_TOLERANCE:
            raise PipelineError(f"{out / files['onnx_fp32'].name} differs from the torch checkpoint by up to "
                                f"{formats['onnx_fp32']['max_abs_dprob']:.2g} in probability (more than {PARITY_TOLERANCE}): "
                                "the export is broken; report it with the torch and onnx versions.")
        t2 = time.perf_counter()
        for name, ms in timings(model, files, x).items():
            formats[name]["ms_per_image"] = ms
        seconds["timing"] = round(time.perf_counter() - t2, 2)
        seen = labelled_test_seen(index)
        int8 = int8_verdict(formats["onnx_fp32"]["accuracy"], formats["onnx_int8"]["accuracy"], len(test), seen)
        scores = {"student": ck["arch"], "img_size": size, "threshold": THRESHOLD, "threads_all": available_cores(),
                  "labelled": {"split": "test", "n_images": int(len(test)), "seen_in_training": seen}, "int8": int8,
                  "formats": formats, "seconds": seconds}
        write_text_whole(folder / "scores.json", json.dumps(scores, indent=2))
        write_text_whole(folder / "metrics.json", json.dumps(
            {name: {"test_accuracy": round(formats[name]["accuracy"], 4)} for name in files}, indent=2))
        manifest = {
            "format": "onnx", "arch": ck["arch"], "parameters": sum(p.numel() for p in model.parameters()),
            "models": {"student": {"file": files["onnx_fp32"].name},
                       "student-int8": {"file": files["onnx_int8"].name, "kept": int8["kept"], "reason": int8["reason"]}},
            "input": {"name": "image", "shape": ["batch", 3, size, size], "dtype": "float32", "channel_order": "RGB",
                      "layout": "NCHW", "resize": f"any size to {size}x{size} (aspect not kept), bilinear (Pillow)",
                      "scale": "pixel / 255", "mean": list(norm["mean"]), "std": list(norm["std"])},
            "output": {"name": "prob", "shape": ["batch"], "meaning": "probability of class 1 (parasitized)"},
            "threshold": THRESHOLD, "classes": {"0": "uninfected", "1": "parasitized"},
            "tta": {"views": list(tta.views), "crop_scale": tta.crop_scale}, "params": ck["params"], "git_commit": git_commit()}
        write_text_whole(folder / onnx_io.MANIFEST, json.dumps(manifest, indent=2))
        keep_others(out, folder)
    for name, r in formats.items():
        log.info("%-10s accuracy %.4f AUC %.4f max|dp| %.1e %6.2f MB, ms/image b1 %.2f b64 %.2f (all threads)", name,
                 r["accuracy"], r["roc_auc"], r["max_abs_dprob"], r["size_mb"], r["ms_per_image"]["batch1_threads_all"],
                 r["ms_per_image"]["batch64_threads_all"])
    log.info("int8 %s: %s (export %.1f s, quantize %.1f s, timing %.1f s)", "kept" if int8["kept"] else "refused",
             int8["reason"], seconds["export"], seconds["quantize"], seconds["timing"])
    return scores


def keep_others(old: Path, new: Path) -> None:
    """Copy into the new folder whatever the old one holds that the export does not write (a user's notes): swapping
    the folder in must not delete them."""
    ours = {"student.onnx", "student.int8.onnx", "scores.json", "metrics.json", onnx_io.MANIFEST}
    for p in sorted(old.iterdir()) if old.is_dir() else []:
        if p.name not in ours:
            shutil.copytree(p, new / p.name, symlinks=True) if p.is_dir() and not p.is_symlink() else \
                shutil.copy2(p, new / p.name, follow_symlinks=False)


def int8_verdict(acc_fp32: float, acc_int8: float, n: int, seen: bool = False) -> dict:
    """Keep int8 within INT8_TOLERANCE_PP of fp32, judged only on a held-out labelled set of INT8_MIN_IMAGES or more;
    `seen`: the labelled images were in training, so no gate uses them."""
    drop = 100 * (acc_fp32 - acc_int8)
    gated = n >= INT8_MIN_IMAGES and not seen
    kept = not gated or drop <= INT8_TOLERANCE_PP
    change = f"int8 accuracy {round(-drop, 2) + 0.0:+.2f} pp against fp32 on {n} labelled images"  # + 0.0: no -0.00
    if seen:
        reason = f"{change}: the labelled test images were in training (data.train_on_test), so reported, not gated"
    elif gated:
        reason = f"{change} ({'within' if kept else 'beyond'} the {INT8_TOLERANCE_PP} pp tolerance)"
    else:
        reason = f"{change}: fewer than {INT8_MIN_IMAGES}, so reported, not gated"
    return {"kept": kept, "gated": gated, "tolerance_pp": INT8_TOLERANCE_PP, "min_images": INT8_MIN_IMAGES,
            "accuracy_drop_pp": round(drop, 3), "reason": reason}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prepared", required=True, type=Path, help="the prepare stage's folder")
    parser.add_argument("--student", required=True, type=Path, help="the distill stage's folder (checkpoint.pt)")
    parser.add_argument("--out", required=True, type=Path, help="folder for the ONNX files and their JSON")
    args = parser.parse_args()
    tta = load_params()["tta"]
    export(args.prepared, args.student, args.out, tta=TTASpec.from_params(tta))


if __name__ == "__main__":
    run_main(main)
