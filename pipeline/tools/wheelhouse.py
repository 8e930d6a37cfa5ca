"""Build a wheelhouse of the packages an offline GPU machine lacks (it has torch and timm), to carry there and install
with `pip install --no-index`; run on a machine with the package registry, from this project's environment."""
from __future__ import annotations

import argparse
import json
import logging
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement

from pipeline.lib.common import PipelineError, run_main

log = logging.getLogger(__name__)

# What the offline GPU box (and a Kaggle image) already has: these and everything they depend on stay untouched.
PRESENT = ("torch", "torchvision", "timm", "numpy", "pandas", "scikit-learn", "scipy", "onnx", "onnxruntime",
           "onnxscript", "opencv-python-headless", "pillow", "tqdm", "pyyaml", "matplotlib", "safetensors")
# What it lacks, in the order the check needs them: albumentations (+ pydantic) for any training, dvclive (which
# pulls in dvc) for the stages' curves, then downloading (kaggle), the student's label check (cleanlab) and the
# report (nbclient, weasyprint).
WANTED = ("albumentations", "pydantic", "dvclive", "dvc", "kaggle", "cleanlab", "nbclient", "nbformat", "nbconvert",
          "ipykernel", "weasyprint", "pypdf")
HEAVY = r"(torch|torchvision|triton|nvidia-.*|cuda-.*)$"  # torch's own CUDA libraries: never carried, never replaced
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "linux_x86_64")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(roots: tuple[str, ...], python_version: str) -> dict[str, str]:
    """Installed distributions `roots` need (themselves included), as {canonical name: installed version}; the
    markers are evaluated for the target Python, so a backport the target does not need is left out."""
    env = {**default_environment(), "python_version": python_version, "python_full_version": f"{python_version}.0"}
    seen, done, todo = {}, set(), [(canonical(r), "") for r in roots]
    while todo:
        name, extra = todo.pop()  # a requirement's extras ("fonttools[woff]") bring their own dependencies
        if (name, extra) in done:
            continue
        done.add((name, extra))
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            raise PipelineError(f"{name} is not installed here: run this from the project's environment "
                                "(`pip install -r requirements.txt`).") from None
        seen[name] = dist.version
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({**env, "extra": extra}):
                todo += [(canonical(req.name), "")] + [(canonical(req.name), e) for e in req.extras]
    return seen


def to_fetch(python_version: str) -> dict[str, str]:
    """WANTED's closure, pinned to the versions tested here, minus PRESENT and HEAVY; the small dependencies both
    share are carried too, for a machine whose own version does not fit (pip keeps the machine's where it does)."""
    present = {canonical(p) for p in PRESENT} | {n for n in closure(("torch", "torchvision"), python_version)
                                                 if re.match(HEAVY, n)}
    return {n: v for n, v in sorted(closure(WANTED, python_version).items()) if n not in present}


def fetch(pins: dict[str, str], out: Path, python_version: str) -> list[str]:
    """Binary wheels for the target Python and platform; a package with none on the registry (a pure-Python sdist)
    is built into a wheel here. Returns the names built locally."""
    out.mkdir(parents=True, exist_ok=True)
    built = []
    target = ["--only-binary=:all:", "--python-version", python_version, "--implementation", "cp",
              *[a for p in PLATFORMS for a in ("--platform", p)]]
    for name, version in pins.items():
        spec = f"{name}=={version}"
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(out), *target, spec]
        if subprocess.run(cmd, capture_output=True, text=True).returncode == 0:
            continue
        r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), spec],
                           capture_output=True, text=True)
        wheels = list(out.glob(f"{re.sub('-', '_', name)}-{version}-*.whl")) + list(out.glob(f"{name}-{version}-*.whl"))
        if r.returncode or not any(w.name.endswith("-none-any.whl") for w in wheels):
            raise PipelineError(f"No wheel of {spec} for Python {python_version} on {PLATFORMS[0]}, and it does not "
                                f"build as a pure-Python wheel here:\n{r.stderr[-2000:]}")
        built.append(spec)
    return built


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("wheels"), help="folder to write (ignored by git)")
    parser.add_argument("--python-version", default="3.12", help="the GPU machine's Python (python3 --version)")
    parser.add_argument("--without-dvc", action="store_true",
                        help="leave out dvc and dvclive (the biggest part): the check then runs the stage modules "
                             "without DVC and the stages without their dvclive curves")
    args = parser.parse_args()
    pins = to_fetch(args.python_version)
    if args.without_dvc:
        dvc_only = set(closure(("dvclive", "dvc"), args.python_version)) - set(closure(
            tuple(w for w in WANTED if w not in ("dvclive", "dvc")), args.python_version))
        pins = {n: v for n, v in pins.items() if n not in dvc_only}
    built = fetch(pins, args.out, args.python_version)
    # Only the packages asked for, pinned: pip takes their dependencies from the folder where the machine lacks them
    # and keeps its own where they satisfy the requirement (pinning every wheel would replace the machine's).
    tops = [canonical(w) for w in WANTED if canonical(w) in pins]
    (args.out / "requirements.txt").write_text("".join(f"{n}=={pins[n]}\n" for n in tops))
    size = sum(f.stat().st_size for f in args.out.glob("*.whl"))
    (args.out / "manifest.json").write_text(json.dumps(
        {"python_version": args.python_version, "platforms": PLATFORMS, "present_on_target": PRESENT,
         "packages": pins, "built_here": built, "megabytes": round(size / 2**20, 1)}, indent=1))
    log.info("%d wheels, %.1f MB in %s (%d built here from pure-Python sources). On the GPU machine:\n"
             "  python3 -m pip install --no-index --find-links %s -r %s/requirements.txt", len(pins), size / 2**20,
             args.out, len(built), args.out, args.out)


if __name__ == "__main__":
    run_main(main)
