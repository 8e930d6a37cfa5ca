"""Kill anywhere, lose nothing: `dvc repro` SIGKILLed (its whole process group) part-way through each stage with
persisted or multi-file outputs, then run again, ends with the same submissions, prediction CSVs and scores, byte for
byte, as one uninterrupted run of the same params (the tiny_chain fixture, shared with test_e2e)."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import yaml

from helpers import check_executed_report, dvc, dvc_command, project_copy, run_outputs, tiny_params

# (stage, what marks part-way through it: a regex on the output after the stage starts, or a glob under the project)
KILL_POINTS = [
    ("download", r"Extracting"),  # unpacking the nested zips into data/.raw.partial
    ("prepare", r"decode:"),  # decoding the cells, before data/.prepared.partial is written
    ("train@resnet10t", r"(?s)Training resnet10t.*Training resnet10t"),  # fold 0 finished, fold 1 started
    ("distill", r"Student resnet10t on"),  # the student's first epoch
    ("export", "glob:data/export/*student*.onnx*"),  # the ONNX written, the int8 model and the timings to come
    ("report", r"Wrote \S*report\.executed\.ipynb"),  # the notebook executed, the HTML and the PDF to come
]
TIMEOUT_S = 900


def repro_killed_in(project: Path, stage: str, point: str) -> str:
    """Run `dvc repro`, SIGKILL its process group at `point` inside `stage`; the output up to the kill."""
    cmd, env = dvc_command("repro")
    proc = subprocess.Popen(cmd, cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    chunks: list[bytes] = []

    def read() -> None:
        for chunk in iter(lambda: proc.stdout.read1(65536), b""):
            chunks.append(chunk)
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    started = f"Running stage '{stage}'"
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while time.monotonic() < deadline:
            text = b"".join(chunks).decode(errors="replace")
            if started in text:
                after = text[text.index(started):]
                hit = (any(project.glob(point[5:])) if point.startswith("glob:") else re.search(point, after))
                if hit:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    return text
            assert proc.poll() is None, f"dvc repro ended before the kill point in {stage}:\n{text[-4000:]}"
            time.sleep(0.05)  # each kill point lasts seconds; a tighter loop takes CPU from the 2 cores' stages
        raise AssertionError(f"no kill point in {stage} within {TIMEOUT_S} s:\n{text[-4000:]}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        reader.join(timeout=10)


def locked_stages(project: Path) -> set[str]:
    lock = project / "dvc.lock"
    return set(yaml.safe_load(lock.read_text())["stages"]) if lock.is_file() else set()


def test_a_repro_killed_in_any_stage_finishes_as_if_it_never_stopped(tiny_chain, shared_data, tmp_path):
    project = project_copy(tmp_path, **tiny_params(shared_data))
    logs = []
    for stage, point in KILL_POINTS:
        logs.append(repro_killed_in(project, stage, point))
        assert stage not in locked_stages(project), f"{stage} finished before the kill:\n{logs[-1][-3000:]}"
    r = dvc(project, "repro")
    logs.append(r.stdout + r.stderr)
    after_train = logs[[s for s, _ in KILL_POINTS].index("train@resnet10t") + 1]
    assert after_train.count("not retraining") == 1, after_train[-3000:]  # fold 0 kept, fold 1 trained again
    assert not [p for p in project.rglob("*") if ".partial" in p.name or p.name.endswith(".old")]
    got = run_outputs(project)
    assert set(got) == set(tiny_chain.outputs)
    differ = sorted(f for f in got if got[f] != tiny_chain.outputs[f])
    assert not differ, f"these outputs differ from an uninterrupted run: {differ}"
    check_executed_report(project)  # the report, its HTML and its PDF whole after the kill in the PDF's writing
