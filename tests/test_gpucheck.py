"""The GPU check's CPU mode end to end (so it cannot rot before a card runs it), its runner, and the wheelhouse's
choice of packages for an offline GPU machine."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.tools import gpucheck, gpuproject, wheelhouse
from pipeline.lib.common import PipelineError
from pipeline.tools.gpusections import Check, Skip

REPO = Path(__file__).resolve().parents[1]


def test_cpu_mode_runs_every_section_that_applies(tmp_path):
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "pipeline.tools.gpucheck", "--device", "cpu", "--out", str(tmp_path)],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "gpucheck.jsonl").read_text().splitlines()]
    assert [row["section"] for row in rows] == [s[0] for s in gpucheck.SECTIONS]
    status = {row["section"]: row["status"] for row in rows}
    assert status.pop("ddp") == "skip" and status.pop("repro") == "skip"
    assert set(status.values()) == {"ok"}, rows
    d = {row["section"]: row["details"] for row in rows}
    assert d["fit"]["auto"]["weights channels_last"] and d["fit"]["auto"]["inputs (device, channels_last)"][1]
    assert d["resume"]["max |Δprob| vs unbroken"] <= 1e-5 and d["resume"]["killed after epoch"] == 1
    assert d["export"]["onnx vs torch fp32 max |Δprob|"] <= 1e-4
    assert d["predictions"]["fp32"]["max |Δ|"] == 0
    table = (tmp_path / "gpucheck.md").read_text()
    assert table.count("\n") == len(rows) + 2 and "| resume | ok |" in table
    assert time.perf_counter() - t0 < 300  # the issue asks <= 2 min on a quiet machine; CI machines vary


def test_a_section_past_its_cap_is_reported_and_the_next_still_runs(tmp_path):
    check = Check(device=None, out=tmp_path)
    def skipped(c):
        raise Skip("not here")

    rows = []
    for name, fn, cap in [("slow", lambda c: time.sleep(5), 0.3), ("skipped", skipped, 5),
                          ("broken", lambda c: 1 / 0, 5), ("fine", lambda c: {"x": 1.5}, 5)]:
        rows.append(gpucheck.run_section(check, name, fn, cap))
        gpucheck.write_row(tmp_path, rows[-1], rows)
        # each row is on disk as soon as its section ends
        assert len((tmp_path / "gpucheck.jsonl").read_text().splitlines()) == len(rows)
    assert [r["status"] for r in rows] == ["timeout", "skip", "fail", "ok"]
    assert rows[0]["seconds"] < 2 and "ZeroDivisionError" in rows[2]["details"]["error"]
    assert "not here" in (tmp_path / "gpucheck.md").read_text()


def test_stage_commands_follow_dvc_yaml_with_one_train_stage_per_backbone(tmp_path):
    project = gpuproject.workspace(tmp_path / "ws", gpus=2)
    cmds = gpuproject.stage_commands(project)
    assert [c.split()[2] for c in cmds[:6]] == ["pipeline.validate", "pipeline.download", "pipeline.lite0_weights",
                                                "pipeline.prepare", "pipeline.folds", "pipeline.train"]
    assert "--backbone resnet10t" in cmds[5] and "${" not in " ".join(cmds)
    assert cmds[-1].split()[2] == "pipeline.report"


def test_wheelhouse_carries_what_the_gpu_machine_lacks_and_never_torch():
    pins = wheelhouse.to_fetch("3.12")
    for needed in ("albumentations", "albucore", "pydantic", "pydantic-core", "dvclive", "dvc", "kaggle", "cleanlab",
                   "nbclient"):
        assert needed in pins, needed
    for present in ("torch", "torchvision", "timm", "numpy", "pandas", "scipy", "onnxruntime", "pillow"):
        assert present not in pins, present
    # torch's CUDA libraries stay the machine's; dvclive's NVML binding (not torch's) is carried
    assert not [n for n in pins if n.startswith(("nvidia-", "triton", "cuda-")) and n != "nvidia-ml-py"]
    assert "nvidia-ml-py" in pins
    # markers are read for the target Python: albumentations needs eval-type-backport below 3.10 only
    assert "eval-type-backport" not in pins
    with pytest.raises(PipelineError, match="eval-type-backport is not installed"):
        wheelhouse.closure(("albumentations",), "3.9")


def test_a_section_cut_short_still_reports_what_it_measured(tmp_path):
    check = Check(device=None, out=tmp_path)

    def long(c):
        c.partial["img/s a"] = 100
        time.sleep(5)

    row = gpucheck.run_section(check, "speed", long, 0.3)
    assert row["status"] == "timeout" and row["details"]["img/s a"] == 100
