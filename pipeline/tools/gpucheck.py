"""A check of the whole GPU path on a real card in about five minutes, on the demo bundle in the repository; each
section's row reaches DIR/gpucheck.jsonl and DIR/gpucheck.md as soon as it ends, so a run cut short still reports.
`--device cpu` runs the sections that apply on the CPU (CI runs it, so the check cannot rot)."""
from __future__ import annotations

import argparse
import json
import logging
import signal
import time
import traceback
import zipfile
from pathlib import Path

import numpy as np

from pipeline.tools import gpuproject as machine
from pipeline.tools import gpusections as model
from pipeline.lib.common import PipelineError, run_main
from pipeline.tools.gpusections import REPO, Check, SectionTimeout, Skip

log = logging.getLogger(__name__)

# name, function, cap on a GPU (s), cap on the CPU (s)
SECTIONS = [("environment", model.environment, 30, 30), ("fit", model.fit_runs, 150, 90),
            ("predictions", model.predictions, 30, 30), ("views", model.views_and_batch_aug, 30, 30),
            ("resume", model.resume, 90, 90), ("export", model.export, 60, 60),
            ("speed", machine.speed_and_memory, 150, 60), ("ddp", machine.ddp, 150, 10),
            ("repro", machine.repro, 300, 300)]


def demo_cells(zip_path: Path, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The demo bundle's cells (public layout) decoded at `size`, with labels from their folders."""
    from pipeline.lib.images import decode

    images, labels = [], []
    with zipfile.ZipFile(zip_path) as z:
        for name in sorted(n for n in z.namelist() if n.endswith(".png")):
            with z.open(name) as f:
                images.append(decode(f, size)[0])
            labels.append(int("/Parasitized/" in f"/{name}"))
    return np.stack(images), np.asarray(labels)


def _timeout(signum, frame):
    raise SectionTimeout


def run_section(check: Check, name: str, fn, cap_s: float) -> dict:
    """Run one section under its time cap; its row: status ok | fail | skip | timeout, seconds, details."""
    t0, details = time.perf_counter(), {}
    check.partial.clear()
    signal.signal(signal.SIGALRM, _timeout)
    signal.setitimer(signal.ITIMER_REAL, cap_s)
    try:
        details = fn(check) or {}
        status = "fail" if details.pop("failed", None) else "ok"
    except Skip as e:
        status, details = "skip", {"reason": str(e)}
    except SectionTimeout:
        status, details = "timeout", {"reason": f"over its cap of {cap_s:.0f} s", **check.partial}
    except Exception as e:  # one broken section must not hide the others' results
        status, details = "fail", {"error": f"{type(e).__name__}: {e}", **check.partial}
        log.error("Section %s failed:\n%s", name, traceback.format_exc())
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    return {"section": name, "status": status, "seconds": round(time.perf_counter() - t0, 1), "details": details}


def write_row(out: Path, row: dict, rows: list[dict]) -> None:
    """Append the row to gpucheck.jsonl and rewrite gpucheck.md with every row so far."""
    with open(out / "gpucheck.jsonl", "a") as f:
        f.write(json.dumps(row, default=str) + "\n")
    lines = ["| section | status | seconds | details |", "|---|---|---|---|"]
    for r in rows:
        text = "; ".join(f"{k}: {_fmt(v)}" for k, v in r["details"].items()).replace("|", "\\|")
        lines.append(f"| {r['section']} | {r['status']} | {r['seconds']} | {text} |")
    (out / "gpucheck.md").write_text("\n".join(lines) + "\n")


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} {_fmt(x)}" for k, x in v.items()) + "}"
    return str(v)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="folder for gpucheck.jsonl, gpucheck.md and scratch")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu", "mps"],
                        help="auto: the GPU when one is visible")
    parser.add_argument("--only", nargs="*", help="run only these sections (by name)")
    parser.add_argument("--demo", type=Path, default=REPO / "data" / "demo.zip", help="the demo bundle")
    args = parser.parse_args()
    import torch

    name = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise PipelineError("--device cuda but torch sees no CUDA GPU; use --device cpu for the CPU mode.")
    check = Check(device=torch.device(name), out=args.out, asked=tuple(args.only or ()))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpucheck.jsonl").unlink(missing_ok=True)
    check.images, check.labels = demo_cells(args.demo, model.SIZE)
    rows = []
    for section, fn, cap_gpu, cap_cpu in SECTIONS:
        if args.only and section not in args.only:
            continue
        log.info("Section %s (cap %d s)", section, cap_gpu if check.cuda else cap_cpu)
        row = run_section(check, section, fn, cap_gpu if check.cuda else cap_cpu)
        rows.append(row)
        write_row(args.out, row, rows)
        log.info("  %s in %.1f s: %s", row["status"], row["seconds"], row["details"])
    log.info("The check's table (%s):\n%s", args.out / "gpucheck.md", (args.out / "gpucheck.md").read_text())
    if any(r["status"] in ("fail", "timeout") for r in rows):
        raise PipelineError(f"The check found problems: see {args.out / 'gpucheck.md'}.")


if __name__ == "__main__":
    run_main(main)
