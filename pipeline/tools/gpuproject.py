"""The GPU check's machine-level sections: speed and memory per backbone, DDP, and a tiny copy of the project end to
end (`dvc repro`, or the stage modules where DVC is not installed)."""
from __future__ import annotations

import importlib.util
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from pipeline.lib.precision import native
from pipeline.tools.gpusections import BACKBONE, REPO, SIZE, Check, Skip


def speed_and_memory(check: Check) -> dict:
    from pipeline.tools.bench import images_per_s
    from pipeline.lib.models import create_model

    d = check.partial  # each figure kept as it comes: a timeout or an out-of-memory still reports the others
    if check.cuda:
        for arch in ("densenet201", "resnet101", "efficientnet_b3"):
            for precision in [p for p in native(check.device) if p != "fp32"]:
                model = create_model(arch).to(check.device).to(memory_format=torch.channels_last)
                torch.cuda.reset_peak_memory_stats(check.device)
                x = torch.randn(128, 3, 160, 160)
                images_per_s(model, iter(lambda: (x, torch.zeros(128, 2)), None), check.device, 1, warmup=0,
                             precision=precision)
                d[f"peak GB {arch} {precision} 160px b128"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
                del model
                torch.cuda.empty_cache()
    archs, sizes, n = (("resnet18", "densenet121", "efficientnet_b0"), (64, 128), 20) if check.cuda else \
        ((BACKBONE,), (SIZE,), 3)
    for arch in archs:
        for size in sizes:
            model = create_model(arch).to(check.device).to(memory_format=torch.channels_last)
            x = torch.randn(64, 3, size, size)
            for precision in native(check.device):
                ips = images_per_s(model, iter(lambda: (x, torch.zeros(64, 2)), None), check.device, n,
                                   precision=precision)
                d[f"img/s {arch} {size}px {precision}"] = round(ips)
    if check.cuda:  # train.compile's row: one backbone, its auto precision, compiled against eager
        from pipeline.lib.precision import choose

        model, x = create_model("resnet18").to(check.device).to(memory_format=torch.channels_last), \
            torch.randn(64, 3, 128, 128)
        precision = choose("auto", check.device, "resnet18")
        t0 = time.perf_counter()
        compiled = torch.compile(model)
        images_per_s(compiled, iter(lambda: (x, torch.zeros(64, 2)), None), check.device, 1, warmup=0,
                     precision=precision)
        d["compile resnet18 128px first step s"] = round(time.perf_counter() - t0, 1)
        d["img/s resnet18 128px compiled"] = round(images_per_s(
            compiled, iter(lambda: (x, torch.zeros(64, 2)), None), check.device, n, precision=precision))
    return dict(d)


def ddp(check: Check) -> dict:
    if not check.cuda or torch.cuda.device_count() < 2:
        raise Skip("one GPU or none here (NCCL refuses two ranks on one device); tests/test_ddp.py runs 2 gloo "
                   "processes on the CPU")
    project = workspace(check.out / "ddp", gpus=2)
    t0 = time.perf_counter()
    for stage in stage_commands(project)[:5]:  # validate, download, prepare, folds, train
        _run(stage, project)
    return {"train stage with 2 processes seconds": round(time.perf_counter() - t0, 1),
            "oof.csv": (project / "data/models" / BACKBONE / "fold0" / "oof.csv").is_file()}


def repro(check: Check) -> dict:
    if check.device.type == "cpu" and "repro" not in check.asked:
        raise Skip("CPU mode: tests/test_e2e.py runs dvc repro; `--only repro` runs it here")
    project = workspace(check.out / "repro", gpus="auto")
    t0 = time.perf_counter()
    if importlib.util.find_spec("dvc") is not None:
        if shutil.which("git"):  # dvclive reads the commit: a repository without one fails
            _run("git init -q", project)
            _run("git add -A", project)
            _run("git -c user.name=gpucheck -c user.email=gpucheck@localhost commit -qm workspace", project)
        else:
            _run(f"{sys.executable} -m dvc config core.no_scm true", project)
        _run(f"{sys.executable} -m dvc repro", project)
        how = "dvc repro"
    else:  # the stage modules in dvc.yaml's order, as DVC would run them; the report plots dvclive's curves
        for cmd in [c for c in stage_commands(project) if "pipeline.report" not in c]:
            _run(cmd, project)
        how = "the stage modules directly up to export (dvc is not installed; the report needs dvclive's curves)"
    subs = sorted(p.name for p in (project / "submissions" / "latest").glob("*.csv"))
    return {"ran": how, "seconds": round(time.perf_counter() - t0, 1), "submission files": len(subs),
            "failed": "student.csv" not in subs}


def workspace(folder: Path, gpus) -> Path:
    """A copy of the project with a tiny params.yaml (one backbone, 2 folds, 1 epoch) on the demo bundle."""
    import yaml

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for name in ("pipeline", "notebooks", ".dvc", "dvc.yaml", ".dvcignore", "data/demo.zip"):
        src, dst = REPO / name, folder / name
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "tmp", "cache"))
        elif src.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    p = yaml.safe_load((REPO / "params.yaml").read_text())
    p["folds"]["n"] = 2
    p["train"].update(backbones=[BACKBONE], epochs=1, gpus=gpus)
    p["distill"].update(student=BACKBONE, epochs=1)
    (folder / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    return folder


def stage_commands(project: Path) -> list[str]:
    """dvc.yaml's commands in order, a train stage per backbone (its matrix), params keys filled in as DVC does, for
    a machine without DVC."""
    import yaml

    params = yaml.safe_load((project / "params.yaml").read_text())
    cmds = []
    for stage in yaml.safe_load((project / "dvc.yaml").read_text())["stages"].values():
        items = params["train"]["backbones"] if "matrix" in stage else [None]
        cmds += [stage["cmd"].replace("${item.backbone}", b) if b else stage["cmd"] for b in items]
    return [re.sub(r"\$\{(\w+)\.(\w+)\}", lambda m: str(params[m.group(1)][m.group(2)]), c) for c in cmds]


def _run(cmd: str, cwd: Path) -> None:
    argv = shlex.split(cmd)
    if argv[0] == "python":
        argv[0] = sys.executable
    r = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"`{cmd}` failed ({r.returncode}): {(r.stderr or r.stdout)[-1500:]}")
