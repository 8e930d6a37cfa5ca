"""`python -m pipeline.predict PATH...`: p(parasitized) and a label for new cell images (files, folders, zips).

The ONNX models run on ONNX Runtime without importing torch; `--model ensemble` runs the fold checkpoints."""
from __future__ import annotations

import argparse
import json
import logging
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
from tqdm import tqdm

from pipeline.lib import onnx_io
from pipeline.lib.archives import MAX_FILES, MEMBER_CAP
from pipeline.lib.common import IMAGE_SUFFIXES, OUTPUT_MARKER, PipelineError, available_cores, run_main, write_text_whole
from pipeline.lib.images import decode, normalize
from pipeline.lib.layout import fold_dirs, full_dir

log = logging.getLogger(__name__)

SYSTEM_FILES = {"thumbs.db", ".ds_store", "desktop.ini", OUTPUT_MARKER.lower()}  # file browsers' and ours; never cells


@dataclass(frozen=True)
class Source:
    """One input image: its output name, where it came from (for messages) and how to open it."""
    name: str
    where: str
    open: Callable[[], object]


def _kind(member: str) -> str:
    """'image', 'system' (a file browser's file, ignored) or 'other' (named as not an image)."""
    name = member.rsplit("/", 1)[-1]
    if name.lower() in SYSTEM_FILES or name.startswith("._") or "__MACOSX/" in member:
        return "system"
    return "image" if Path(name).suffix.lower() in IMAGE_SUFFIXES else "other"


def _member(z: zipfile.ZipFile, info: zipfile.ZipInfo):
    """A zip member as a stream (never read whole into memory), refused when encrypted or too large for a cell."""
    if info.flag_bits & 0x1:
        raise PipelineError("encrypted (password-protected); predict reads no encrypted members")
    if info.file_size > MEMBER_CAP:
        raise PipelineError(f"{info.file_size:,} bytes, more than the {MEMBER_CAP:,} cap on one cell image")
    return z.open(info)


def _file(path: Path):
    """An image file, opened unless it is too large to be a cell."""
    if (size := path.stat().st_size) > MEMBER_CAP:
        raise PipelineError(f"{size:,} bytes, more than the {MEMBER_CAP:,} cap on one cell image")
    return open(path, "rb")


def collect(paths: list[str]) -> tuple[list[Source], list[str], int]:
    """Every image under `paths` in argument order (folders and zips sorted by path), the files that are not
    images, and how many file-browser files were ignored."""
    sources, other, system = [], [], 0
    for arg in paths:
        path = Path(arg)
        if path.is_dir():
            members = [(f.relative_to(path).as_posix(), str(f), lambda f=f: open(f, "rb"))
                       for f in sorted(path.rglob("*")) if f.is_file()]
        elif path.is_file() and path.suffix.lower() == ".zip":
            try:  # left open for the decoding threads: each opens its own stream of a member (thread-safe)
                z = zipfile.ZipFile(path)
            except (zipfile.BadZipFile, OSError) as e:
                raise PipelineError(f"{path}: not a readable zip ({e}).") from None
            infos = sorted((i for i in z.infolist() if not i.is_dir()), key=lambda i: i.filename)
            if len(infos) > MAX_FILES:
                raise PipelineError(f"{path} holds {len(infos):,} files, more than the {MAX_FILES:,} predict reads.")
            members = [(i.filename, f"{path}:{i.filename}", lambda i=i, z=z: _member(z, i)) for i in infos]
        elif path.is_file():
            members = [(path.name, str(path), lambda p=path: _file(p))]
        else:
            raise PipelineError(f"{arg}: no such file or folder.")
        for member, where, opener in members:
            kind = _kind(member)
            system += kind == "system"
            if kind == "other":
                other.append(f"{where} (not a PNG or JPEG image)")
            elif kind == "image":
                sources.append(Source(member.rsplit("/", 1)[-1], where, opener))
    return sources, other, system


def decode_sources(sources: list[Source], size: int, workers: int) -> tuple[np.ndarray, list[str]]:
    """Decode every source at size x size (the cache's own decoding); the failures, each named."""
    images = np.zeros((len(sources), size, size, 3), np.uint8)

    def one(i: int) -> str | None:
        try:
            with sources[i].open() as f:
                images[i] = decode(f, size)[0]
        except PipelineError as e:  # not a PNG or JPEG, too many pixels or bytes, encrypted: says which
            return f"{sources[i].where} ({e})"
        except Exception as e:  # Pillow and zipfile raise many kinds for broken files
            return f"{sources[i].where} ({type(e).__name__}: {e})"
        return None

    with ThreadPoolExecutor(workers) as pool:
        errors = list(tqdm(pool.map(one, range(len(sources))), total=len(sources), desc="decode", unit="img",
                           disable=None))
    return images, errors


def onnx_probs(images: np.ndarray, export_dir: Path, model: str, tta: bool, threads: int | None,
               batch_size: int, manifest: dict) -> np.ndarray:
    """The exported student (fp32 or int8) on ONNX Runtime."""
    entry = manifest["models"][model]
    if not entry.get("kept", True):
        raise PipelineError(f"--model {model} is refused for this run: {entry['reason']}. Use --model student.")
    sess = onnx_io.session(export_dir / entry["file"], threads)
    views = manifest["tta"]["views"] if tta else ["identity"]
    out = []
    with tqdm(total=len(images), desc=model, unit="img", disable=None) as bar:
        for start in range(0, len(images), 4096):  # float32 copies of a few thousand images at a time, not all
            x = normalize(images[start:start + 4096], manifest["input"]["mean"], manifest["input"]["std"])
            out.append(onnx_io.predict(sess, x, views, manifest["tta"]["crop_scale"], batch_size, bar))
    return np.concatenate(out)


def ensemble_probs(images: np.ndarray, models_dir: Path, ensemble_dir: Path, tta: bool, batch_size: int
                   ) -> tuple[np.ndarray, float]:
    """Every fold checkpoint (or the refit or all-cells model, full/) of every blended backbone, blended as the ensemble
    stage chose, with the TTA views its run recorded; returns the probabilities and the threshold."""
    # Imported here: the checkpoints need torch, the ONNX path does not.
    from pipeline.lib.blend import blend
    from pipeline.lib.engine import InferConfig
    from pipeline.lib.predictions import backbone_probs
    from pipeline.lib.tta import TTASpec

    scores = ensemble_dir / "scores.json"
    if not scores.is_file():
        raise PipelineError(f"{scores} is missing: run `dvc repro ensemble` first.")
    report = json.loads(scores.read_text())
    chosen = report["blend"]["ensemble_tta" if tta else "ensemble"]
    # train.refit or folds.n 0 (no CV): the submission used the full/ models of these backbones
    refit = set(report.get("refit", {}).get("backbones", [])) if report.get("cv", True) else set(chosen["weights"])
    tta_params = report.get("tta")  # what the run's `_tta` columns used, not today's params.yaml
    if tta and tta_params is None:
        raise PipelineError(f"{scores} does not say which TTA views its run used (it was written before they were "
                            "recorded): run `dvc repro ensemble`, or predict without --tta.")
    spec = TTASpec.from_params(tta_params) if tta else TTASpec()  # the identity view alone
    cfg = InferConfig(batch_size=batch_size, num_workers=0, device="auto")
    columns = [backbone_probs(models_dir, b, b in refit, images, spec, cfg) for b in chosen["weights"]]
    return blend(np.stack(columns, 1), np.asarray(list(chosen["weights"].values()))), chosen["threshold"]


def image_size(model: str, export_dir: Path, models_dir: Path) -> int:
    """The side the model was trained at: images are decoded to it, as the cache was."""
    if model != "ensemble":
        return int(onnx_io.load_manifest(export_dir)["input"]["shape"][-1])
    from pipeline.lib.weights_only import read_checkpoint  # torch: only the ensemble needs it

    backbones = sorted(d for d in models_dir.iterdir() if d.is_dir()) if models_dir.is_dir() else []
    ckpts = ([d / "checkpoint.pt" for b in backbones for d in fold_dirs(b, "checkpoint.pt")]
             or [f for b in backbones if (f := full_dir(models_dir, b.name) / "checkpoint.pt").is_file()])
    if not ckpts:
        raise PipelineError(f"{models_dir} has no checkpoints: run `dvc repro` first.")
    return int(read_checkpoint(ckpts[0])["params"]["img_size"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("paths", nargs="+", help="image files (PNG/JPEG), folders of them, or zips of them")
    parser.add_argument("--model", choices=["student", "student-int8", "ensemble"], default="student")
    parser.add_argument("--tta", action="store_true", help="average the TTA views the run used (the ensemble: "
                        "recorded in data/ensemble/scores.json; an ONNX model: its manifest)")
    parser.add_argument("-o", "--output", type=Path, help="CSV to write (img_name,prob,label); default: stdout")
    parser.add_argument("--skip-bad", action="store_true", help="skip files that are not images, with a warning")
    parser.add_argument("--export", type=Path, default=Path("data/export"), help="the export stage's folder")
    parser.add_argument("--models", type=Path, default=Path("data/models"), help="the fold checkpoints (ensemble)")
    parser.add_argument("--ensemble", type=Path, default=Path("data/ensemble"), help="the blend (ensemble)")
    parser.add_argument("--batch-size", type=int, default=64,
                        help="images per batch (torch checkpoints on a CPU predict in batches of at least 128)")
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads (default: every core)")
    args = parser.parse_args()
    size = image_size(args.model, args.export, args.models)
    sources, bad, system = collect(args.paths)
    if system:
        log.info("Ignored %d file-browser files (Thumbs.db, .DS_Store, ...)", system)
    images, errors = decode_sources(sources, size, min(8, available_cores()))
    bad += [e for e in errors if e]
    if bad and not args.skip_bad:
        raise PipelineError(f"{len(bad)} input files are not readable images; remove them or pass --skip-bad:\n  "
                            + "\n  ".join(bad[:50]) + (f"\n  ... and {len(bad) - 50} more" if len(bad) > 50 else ""))
    if bad:
        log.warning("Skipped %d files that are not readable images:\n  %s", len(bad), "\n  ".join(bad))
    keep = [i for i, e in enumerate(errors) if e is None]
    sources, images = [sources[i] for i in keep], images[keep]
    if not sources:
        raise PipelineError(f"No images found in {', '.join(args.paths)} (PNG or JPEG files, folders or zips).")
    if args.model == "ensemble":
        prob, threshold = ensemble_probs(images, args.models, args.ensemble, args.tta, args.batch_size)
    else:
        manifest = onnx_io.load_manifest(args.export)
        prob = onnx_probs(images, args.export, args.model, args.tta, args.threads, args.batch_size, manifest)
        threshold = manifest["threshold"]
    out = pd.DataFrame({"img_name": [s.name for s in sources], "prob": prob, "label": (prob >= threshold).astype(int)})
    if out["img_name"].duplicated().any():
        log.warning("Some file names repeat across the inputs (e.g. %s); rows stay in input order",
                    out.loc[out["img_name"].duplicated(), "img_name"].iat[0])
    if args.output:  # whole or not at all: a killed run never leaves half a CSV that reads as complete
        args.output.parent.mkdir(parents=True, exist_ok=True)
        write_text_whole(args.output, out.to_csv(index=False, float_format="%.6f"))
    else:
        out.to_csv(sys.stdout, index=False, float_format="%.6f")
    log.info("%d images, %d labelled parasitized (threshold %.3f, model %s%s)%s", len(out), out["label"].sum(),
             threshold, args.model, " with TTA" if args.tta else "", f"; wrote {args.output}" if args.output else "")


if __name__ == "__main__":
    run_main(main)
