"""DDP (torchrun, gloo on the CPU): sharding, the stage re-launching itself, resume under DDP, a failing rank."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from pipeline.lib import checkpoints
from pipeline.lib import distributed as ddp
from pipeline.lib import engine
from pipeline.lib.checkpoints import load_checkpoint
from pipeline.lib.common import PipelineError
from pipeline.lib.dataset import CellDataset, load_cache, split_rows
from pipeline.folds import make_folds
from pipeline.lib.metrics import binary_metrics
from pipeline.lib.params import with_overrides
from helpers import dvc, project_copy, sha256, train_cfg

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}", "OMP_NUM_THREADS": "1"}


def as_rank(monkeypatch, rank: int, world: int) -> None:
    monkeypatch.setattr(ddp, "rank", lambda: rank)
    monkeypatch.setattr(ddp, "world", lambda: world)


@pytest.mark.parametrize("n", [64, 67])
def test_each_epoch_every_image_is_drawn_once_across_ranks(monkeypatch, n):
    ds = CellDataset(np.zeros((n, 8, 8, 3), np.uint8), np.zeros((n, 2), np.float32), transform=None)
    cfg = train_cfg(batch_size=8, num_workers=0, device="cpu", seed=3)
    orders = {}
    for epoch in (1, 2):
        drawn = []
        for r in range(2):
            as_rank(monkeypatch, r, 2)
            sampler = engine.train_loader(ds, cfg, torch.device("cpu")).sampler
            sampler.set_epoch(epoch)
            tagged = list(sampler)
            assert all(t // n == epoch for t in tagged)  # the epoch travels with the index, for the augmentation
            drawn += [t % n for t in tagged]
        counts = np.bincount(drawn, minlength=n)
        # Every image once; with an odd count DistributedSampler repeats one image so the ranks take equal steps.
        assert counts.min() == 1 and counts.sum() == n + n % 2
        orders[epoch] = drawn
    assert orders[1] != orders[2]  # a new shuffle each epoch


def test_train_batch_size_is_the_global_batch_split_over_the_processes(monkeypatch):
    ds = CellDataset(np.zeros((64, 8, 8, 3), np.uint8), np.zeros((64, 2), np.float32), transform=None)
    cfg = train_cfg(batch_size=32, num_workers=0, device="cpu")
    for world in (1, 2, 4):
        as_rank(monkeypatch, 0, world)
        batches = engine.train_loader(ds, cfg, torch.device("cpu"))
        assert batches.batch_size == 32 // world and len(batches) == 2  # the same steps per epoch at any count
    with pytest.raises(PipelineError, match=r"train.batch_size 33 \(the global batch\) does not split evenly over 2 "
                                            r"processes \(train.gpus\): set it to a multiple of 2, e.g. 32 or 34"):
        ddp.local_batch(33, 2)
    with pytest.raises(PipelineError, match="leaves fewer than 2 images per process, and BatchNorm needs 2: set "
                                            "train.batch_size to at least 8"):
        ddp.local_batch(6, 4)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    with pytest.raises(PipelineError, match="train.gpus: 2 is not allowed: train.batch_size 33 .* does not split"):
        with_overrides(params, ["train.gpus=2", "train.batch_size=33"])  # the schema says so when gpus is a number


def test_the_process_split_is_resume_only():
    one, two = (checkpoints.run_fingerprint(train_cfg(world_size=n, sync_bn=n > 1),
                                            checkpoints.fingerprint({"a": 1}, {"b": "c"}))
                for n in (1, 2))
    assert one["params"] == two["params"] and not checkpoints.differences(one, two)  # a finished model is reused
    assert checkpoints.resume_only_differences(two, one) == [
        "it was trained with 2 processes and this run has 1 (a half-trained run resumes only at the same process "
        "count)", "it was trained with train.sync_bn True and this run has False (a half-trained run resumes only "
        "with the same)"]


def test_sharded_prediction_is_gathered_in_the_original_order(monkeypatch):
    parts = {r: np.arange(r, 11, 3, dtype=float)[:, None] * 10 for r in range(3)}  # what each rank predicted
    monkeypatch.setattr(ddp, "active", lambda: True)
    monkeypatch.setattr(ddp, "world", lambda: 3)
    monkeypatch.setattr(ddp.dist, "all_gather_object", lambda out, part: out.__setitem__(slice(None), parts.values()))
    for r in range(3):
        monkeypatch.setattr(ddp, "rank", lambda r=r: r)
        assert np.array_equal(ddp.shard(11) * 10.0, parts[r][:, 0])
    np.testing.assert_array_equal(ddp.gather_rows(parts[0], 11)[:, 0], np.arange(11) * 10.0)


def test_processes_wanted_on_the_cpu():
    assert ddp.processes_wanted("auto", "cpu") == 1
    assert ddp.processes_wanted(2, "cpu") == 2
    if not torch.cuda.is_available():
        with pytest.raises(PipelineError, match="train.gpus is 2 but 0 CUDA GPU"):
            ddp.processes_wanted(2, "cuda")


@pytest.fixture(scope="module")
def small_project(nndl_prepared, tmp_path_factory) -> Path:
    """A project folder: params.yaml (resnet10t, 32 px, CPU) and a 2-fold folds.csv over 1,200 real training cells."""
    root = tmp_path_factory.mktemp("ddp")
    index = pd.read_csv(nndl_prepared.out / "index.csv", dtype={"img_name": str})
    train = index[index["split"] == "train"].sample(n=1200, random_state=0)
    make_folds(train, n=2, group_by="patient", seed=0).to_csv(root / "folds.csv", index=False)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["img_size"] = nndl_prepared.img_size
    params["train"].update(backbones=["resnet10t"], epochs=4, batch_size=32, device="cpu", num_workers=0, patience=9,
                           precision="fp32", lr=0.003)
    params["tta"]["views"] = ["identity", "hflip"]
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


def run_train(project: Path, prepared: Path, out: Path, timeout: float = 300, fold: int | None = None,
              **train) -> subprocess.CompletedProcess:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"].update(train)
    (out.parent / "params.yaml").write_text(yaml.safe_dump(params))
    return subprocess.run([sys.executable, "-m", "pipeline.train", "--backbone", "resnet10t", "--prepared",
                           str(prepared), "--folds", str(project / "folds.csv"), "--out", str(out),
                           *(["--fold", str(fold)] if fold is not None else [])],
                          cwd=out.parent, env=ENV, capture_output=True, text=True, timeout=timeout)


def oof_scores(out: Path, index: pd.DataFrame, folds: pd.DataFrame) -> dict:
    oof = pd.concat(pd.read_csv(f, dtype={"img_name": str}) for f in sorted(out.glob("fold*/oof.csv")))
    assert sorted(oof["img_name"]) == sorted(folds["img_name"])  # every fold image exactly once
    y = index.set_index("img_name").loc[oof["img_name"], "label"].to_numpy(int)
    return binary_metrics(y, oof["prob"].to_numpy())


@pytest.fixture(scope="module")
def one_and_two(small_project, nndl_prepared, tmp_path_factory) -> dict[str, tuple[Path, str, float]]:
    """The small project trained to the end by 1 process and by 2, with the same params (train.batch_size 32, the
    global batch): per name, its models folder, its log and its seconds."""
    root = tmp_path_factory.mktemp("one_and_two")
    runs = {}
    for name, gpus in (("one", 1), ("two", 2)):
        (root / name).mkdir()
        start = time.perf_counter()
        r = run_train(small_project, nndl_prepared.out, root / name / "models", gpus=gpus)
        assert r.returncode == 0, r.stderr[-3000:]
        runs[name] = (root / name / "models", r.stderr, time.perf_counter() - start)
    return runs


def test_two_gloo_processes_train_like_one(one_and_two, small_project, nndl_prepared):
    index, images = load_cache(nndl_prepared.out)
    folds = pd.read_csv(small_project / "folds.csv", dtype={"img_name": str})
    (one, one_log, t_one), (two, two_log, t_two) = one_and_two["one"], one_and_two["two"]
    assert "Launching 2 processes (DDP)" in two_log and "DDP rank 0 of 2 (gloo)" in two_log
    # The same params, the same global batch (so the same steps per epoch), split over the processes.
    assert "batch 32 (global) = 32 x 1 process(es)" in one_log and "batch 32 (global) = 16 x 2 process(es)" in two_log
    a, b = (oof_scores(d, index, folds) for d in (one, two))
    print(f"1 process: {t_one:.1f} s, OOF {a}\n2 processes: {t_two:.1f} s, OOF {b}")
    # Measured: AUC within 0.02, accuracy within 0.04 (other shuffles, other augmentation draws per step).
    assert b["roc_auc"] > 0.8 and abs(a["roc_auc"] - b["roc_auc"]) < 0.05 and abs(a["accuracy"] - b["accuracy"]) < 0.08
    for split in ("test", "hidden"):  # every test/hidden image once, in the index's order
        df = pd.read_csv(two / "fold0" / f"{split}.csv", dtype={"img_name": str})
        assert df["img_name"].tolist() == index["img_name"].iloc[split_rows(index, split)].tolist()
    model, ck = load_checkpoint(two / "fold0" / "checkpoint.pt")  # one process loads it
    lasts = [torch.load(d / "fold0" / "last.pt", weights_only=True)["fingerprint"] for d in (one, two)]
    assert lasts[0]["params"] == lasts[1]["params"]  # one recipe: the process count is recorded apart, to resume only
    assert [f["resume_only"]["config.world_size"] for f in lasts] == [1, 2]
    x = torch.as_tensor(np.asarray(images[:4]), dtype=torch.float32).permute(0, 3, 1, 2) / 255
    assert torch.isfinite(model(x)).all()
    assert not (two / "fold0" / "live" / "rank1").exists()


def test_a_finished_model_is_reused_at_any_process_count(one_and_two, small_project, nndl_prepared, tmp_path):
    """The README's keep-and-resume recipe across machines: models finished on 2x T4 are reused on a P100, and back."""
    for name, gpus in (("two", 1), ("one", 2)):
        models = tmp_path / name / "models"
        shutil.copytree(one_and_two[name][0], models)
        kept = {d.name: sha256(d / "checkpoint.pt") for d in models.glob("fold*")}
        r = run_train(small_project, nndl_prepared.out, models, gpus=gpus)
        assert r.returncode == 0, r.stderr[-3000:]
        assert r.stderr.count("; not retraining") == 2 and "Setting aside" not in r.stderr, r.stderr[-3000:]
        assert {d.name: sha256(d / "checkpoint.pt") for d in models.glob("fold*")} == kept
        assert ("Launching 2 processes (DDP)" in r.stderr) == (gpus == 2)


def test_a_killed_ddp_run_resumes_at_its_process_count_and_restarts_at_another(small_project, nndl_prepared,
                                                                               tmp_path):
    out = tmp_path / "models"
    params = yaml.safe_load((small_project / "params.yaml").read_text())
    params["train"].update(gpus=2, epochs=2)  # killed in epoch 2: resumed after epoch 1
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    cmd = [sys.executable, "-m", "pipeline.train", "--backbone", "resnet10t", "--prepared", str(nndl_prepared.out),
           "--folds", str(small_project / "folds.csv"), "--out", str(out), "--fold", "0"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=ENV, start_new_session=True, stderr=subprocess.DEVNULL)
    last = out / "fold0" / "last.pt"
    deadline = time.time() + 240
    while not last.is_file() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the stage and torchrun, mid-run; the workers die with torchrun
    proc.wait()
    deadline = time.time() + 30
    while subprocess.run(["pgrep", "-f", str(out)], capture_output=True).stdout and time.time() < deadline:
        time.sleep(0.1)
    assert not subprocess.run(["pgrep", "-f", str(out)], capture_output=True).stdout, "a worker outlived torchrun"
    assert last.is_file(), "no epoch finished before the deadline"
    done = torch.load(last, map_location="cpu", weights_only=True)["state"]["epoch"]
    assert done < 2
    # One process (a P100 after 2x T4): the half-trained run is set aside, saying why, and trained again from scratch.
    (tmp_path / "p100").mkdir()
    shutil.copytree(out, tmp_path / "p100" / "models")
    single = run_train(small_project, nndl_prepared.out, tmp_path / "p100" / "models", gpus=1, epochs=2, fold=0)
    assert single.returncode == 0, single.stderr[-3000:]
    p100_last = tmp_path / "p100" / "models" / "fold0" / "last.pt"
    assert (f"Setting aside {p100_last} and training from scratch, because it was trained with 2 processes and this "
            "run has 1 (a half-trained run resumes only at the same process count)") in single.stderr, \
        single.stderr[-3000:]
    assert "Resuming" not in single.stderr and "epoch 1/2" in single.stderr
    finished = torch.load(p100_last, map_location="cpu", weights_only=True)
    assert finished["state"]["epoch"] == 2 and finished["fingerprint"]["resume_only"]["config.world_size"] == 1
    # Two processes again: it resumes where it stopped.
    again = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"after epoch {done} (same params and data)" in again.stderr
    assert torch.load(last, map_location="cpu", weights_only=True)["state"]["epoch"] == 2


def test_a_rank_that_raises_fails_the_stage_with_its_error(tmp_path, monkeypatch):
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    start = time.perf_counter()
    with pytest.raises(PipelineError, match="failed in rank 1 of 2: rank 1 broke on purpose"):
        ddp.relaunch("ddp_failing_worker", [], 2)
    # Rank 0 waits in a collective that rank 1 never joins: torchrun stops it instead of letting it hang.
    assert time.perf_counter() - start < 60


def test_dvc_repro_trains_teachers_and_student_under_ddp(tmp_path):
    """`dvc repro` with train.gpus 2 on the CPU: the train and distill stages launch torchrun themselves; no new
    command in dvc.yaml."""
    # A few hundred generated cells: the launching is under test here; learning under DDP is
    # test_two_gloo_processes_train_like_one's.
    project = project_copy(tmp_path, **{
        "data.source": "synthetic", "data.synthetic": {"n_train": 300, "n_test": 60, "n_hidden": 60},
        "data.img_size": 32, "folds.n": 2, "train.backbones": ["resnet10t"], "train.epochs": 1, "train.batch_size": 64,
        "train.num_workers": 0, "train.gpus": 2, "train.device": "cpu", "distill.epochs": 1,
        "distill.timing_images": 16, "tta.views": ["identity"]})
    r = dvc(project, "repro", "distill")
    log = r.stdout + r.stderr
    assert log.count("Launching 2 processes (DDP)") == 2, log[-3000:]  # train@resnet10t and distill
    index = pd.read_csv(project / "data/prepared/index.csv", dtype={"img_name": str})
    test = pd.read_csv(project / "data/student/test.csv", dtype={"img_name": str})
    assert test["img_name"].tolist() == index.loc[index["split"] == "test", "img_name"].tolist()
    assert test["prob"].between(0, 1).all() and test["prob"].std() > 0  # a model's outputs, not a constant
    load_checkpoint(project / "data/student/checkpoint.pt")
    assert "didn't change" in dvc(project, "repro", "distill").stdout
