"""`python -m pipeline.predict`: files, folders and zips of any size and format, in order, as the pipeline scores them."""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pipeline.lib.dataset import CellDataset, targets
from pipeline.lib.engine import InferConfig, predict
from pipeline.lib.images import decode
from pipeline.lib.checkpoints import load_checkpoint
from pipeline.lib.transforms import AugParams, build_transform

ROOT = Path(__file__).resolve().parents[1]


def run_predict(*args, cwd: Path | None = None, code: str = "") -> subprocess.CompletedProcess:
    """`python -m pipeline.predict ARGS` in a subprocess; `code` runs after main() (e.g. to inspect sys.modules)."""
    script = (f"import sys; sys.argv = ['predict', *{list(map(str, args))!r}]\n"
              "from pipeline.lib.common import run_main; from pipeline.predict import main\n"
              f"try:\n    run_main(main)\nfinally:\n    {code or 'pass'}\n")
    return subprocess.run([sys.executable, "-c", script], cwd=cwd or ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def pipeline_probs(student: Path, paths: list[Path], size: int, views=("identity",)) -> np.ndarray:
    """fp32 inference of the checkpoint through the pipeline: the cache's decoding, the eval transform, predict()."""
    model, ck = load_checkpoint(student / "checkpoint.pt")
    images = np.stack([decode(p, size)[0] for p in paths])
    ds = CellDataset(images, targets(np.zeros(len(images))), build_transform(False, AugParams(), **ck["data_config"]))
    return predict(model, ds, InferConfig(device="cpu"), torch.device("cpu"), list(views)).mean(1)


@pytest.fixture
def mixed_inputs(tmp_path, shared_data) -> dict:
    """A folder of native-size originals, a zip of a few of them, and single files as JPEG, RGBA and grayscale."""
    originals = sorted((shared_data / "originals").rglob("*.png"))
    folder = tmp_path / "cells"
    shutil.copytree(shared_data / "originals", folder)
    (folder / "Parasitized" / "Thumbs.db").write_bytes(b"\0" * 64)  # ignored, as file browsers write them
    zipped = tmp_path / "some.zip"
    with zipfile.ZipFile(zipped, "w") as z:
        for p in originals[:5]:
            z.write(p, f"inner/{p.name}")
    rgb = Image.open(originals[0]).convert("RGB")
    singles = [tmp_path / "a.jpg", tmp_path / "b_rgba.png", tmp_path / "c_gray.png"]
    rgb.save(singles[0], quality=95)
    rgb.convert("RGBA").save(singles[1])
    rgb.convert("L").save(singles[2])
    folder_files = sorted(p for p in folder.rglob("*.png"))
    zip_files = originals[:5]
    return {"args": [singles[0], folder, zipped, singles[1], singles[2]],
            "files": [singles[0], *folder_files, *zip_files, singles[1], singles[2]]}


def test_student_on_files_folders_and_zips_matches_the_pipeline(exported_student, mixed_inputs, tmp_path):
    out = tmp_path / "out.csv"
    r = run_predict(*mixed_inputs["args"], "--export", exported_student.export, "-o", out,
                    code="print('TORCH_IMPORTED', 'torch' in sys.modules)")
    assert r.returncode == 0, r.stderr
    assert "TORCH_IMPORTED False" in r.stdout  # the ONNX path runs without PyTorch
    df = pd.read_csv(out)
    assert list(df.columns) == ["img_name", "prob", "label"]
    assert df["img_name"].tolist() == [p.name for p in mixed_inputs["files"]]  # input order, every image once
    ref = pipeline_probs(exported_student.student, mixed_inputs["files"], 32)
    np.testing.assert_allclose(df["prob"], ref, atol=1e-4)
    assert (df["label"] == (df["prob"] >= 0.5)).all()
    sizes = {Image.open(p).size for p in mixed_inputs["files"]}
    assert len(sizes) > 5  # native sizes vary: the resize is the cache's


def test_tta_and_stdout(exported_student, shared_data):
    files = sorted((shared_data / "originals" / "Parasitized").glob("*.png"))
    r = run_predict(*files, "--export", exported_student.export, "--tta")
    assert r.returncode == 0, r.stderr
    df = pd.read_csv(io.StringIO(r.stdout))
    ref = pipeline_probs(exported_student.student, files, 32, ["identity", "hflip", "crop_center"])
    np.testing.assert_allclose(df["prob"], ref, atol=1e-4)


def test_int8_model_runs_and_is_refused_when_the_gate_failed(exported_student, shared_data, tmp_path):
    files = sorted((shared_data / "originals").rglob("*.png"))
    r = run_predict(*files, "--export", exported_student.export, "--model", "student-int8")
    assert r.returncode == 0, r.stderr
    assert len(pd.read_csv(io.StringIO(r.stdout))) == len(files)
    refused = tmp_path / "export"
    shutil.copytree(exported_student.export, refused)
    m = json.loads((refused / "model.json").read_text())
    m["models"]["student-int8"].update(kept=False, reason="int8 accuracy is 1.20 pp below fp32 on 600 images")
    (refused / "model.json").write_text(json.dumps(m))
    r = run_predict(*files, "--export", refused, "--model", "student-int8")
    assert r.returncode == 1 and "1.20 pp below fp32" in r.stderr and "Traceback" not in r.stderr


def test_bad_files_are_named_or_skipped_with_a_warning(exported_student, shared_data, tmp_path):
    folder = tmp_path / "cells"
    shutil.copytree(shared_data / "originals" / "Uninfected", folder)
    (folder / "notes.txt").write_text("not a cell")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    r = run_predict(folder, "--export", exported_student.export)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "notes.txt" in r.stderr and "broken.png" in r.stderr and "--skip-bad" in r.stderr
    r = run_predict(folder, "--export", exported_student.export, "--skip-bad")
    assert r.returncode == 0, r.stderr
    assert "notes.txt" in r.stderr and "broken.png" in r.stderr  # warned, not silently dropped
    df = pd.read_csv(io.StringIO(r.stdout))
    assert df["img_name"].tolist() == sorted(p.name for p in (shared_data / "originals" / "Uninfected").glob("*.png"))
    r = run_predict(tmp_path / "missing.png", "--export", exported_student.export)
    assert r.returncode == 1 and "missing.png: no such file or folder" in r.stderr
    r = run_predict(folder, "--export", tmp_path / "nowhere")
    assert r.returncode == 1 and "dvc repro export" in r.stderr


def test_ensemble_blends_the_fold_checkpoints(exported_student, shared_data, tmp_path):
    """Two 'folds' that are the same network blended with weight 1 give that network's probabilities."""
    models, ensemble = tmp_path / "models", tmp_path / "ensemble"
    for k in (0, 1):
        (models / "resnet10t" / f"fold{k}").mkdir(parents=True)
        shutil.copy(exported_student.student / "checkpoint.pt", models / "resnet10t" / f"fold{k}" / "checkpoint.pt")
    ensemble.mkdir()
    blend = {"method": "mean", "weights": {"resnet10t": 1.0}, "threshold": 0.3}
    (ensemble / "scores.json").write_text(json.dumps({"blend": {"ensemble": blend, "ensemble_tta": blend}}))
    files = sorted((shared_data / "originals").rglob("*.png"))
    r = run_predict(*files, "--model", "ensemble", "--models", models, "--ensemble", ensemble)
    assert r.returncode == 0, r.stderr
    df = pd.read_csv(io.StringIO(r.stdout))
    np.testing.assert_allclose(df["prob"], pipeline_probs(exported_student.student, files, 32), atol=1e-4)
    assert (df["label"] == (df["prob"] >= 0.3)).all()


def test_ensemble_tta_uses_the_views_its_run_recorded_not_todays_params(exported_student, shared_data, tmp_path):
    """predict --model ensemble --tta averages the views in data/ensemble/scores.json (the run's), whatever
    params.yaml says now (its default adds hflip); a scores.json without them is named, not guessed."""
    models, ensemble = tmp_path / "models", tmp_path / "ensemble"
    (models / "resnet10t" / "fold0").mkdir(parents=True)
    shutil.copy(exported_student.student / "checkpoint.pt", models / "resnet10t" / "fold0" / "checkpoint.pt")
    ensemble.mkdir()
    blend = {"method": "mean", "weights": {"resnet10t": 1.0}, "threshold": 0.5}
    scores = {"blend": {"ensemble": blend, "ensemble_tta": blend}}
    files = sorted((shared_data / "originals").rglob("*.png"))
    (ensemble / "scores.json").write_text(json.dumps(scores))
    r = run_predict(*files, "--model", "ensemble", "--tta", "--models", models, "--ensemble", ensemble)
    assert r.returncode == 1 and "does not say which TTA views" in r.stderr and "Traceback" not in r.stderr
    (ensemble / "scores.json").write_text(json.dumps({**scores, "tta": {"views": ["identity"], "crop_scale": 0.875}}))
    r = run_predict(*files, "--model", "ensemble", "--tta", "--models", models, "--ensemble", ensemble)
    assert r.returncode == 0, r.stderr
    np.testing.assert_allclose(pd.read_csv(io.StringIO(r.stdout))["prob"],
                               pipeline_probs(exported_student.student, files, 32), atol=1e-4)
    (ensemble / "scores.json").write_text(json.dumps({**scores, "tta": {"views": ["vflip"], "crop_scale": 0.875}}))
    r = run_predict(*files, "--model", "ensemble", "--tta", "--models", models, "--ensemble", ensemble)
    assert r.returncode == 0, r.stderr
    flipped = pd.read_csv(io.StringIO(r.stdout))["prob"].to_numpy()
    np.testing.assert_allclose(flipped, pipeline_probs(exported_student.student, files, 32, ["vflip"]), atol=1e-4)
    assert np.abs(flipped - pipeline_probs(exported_student.student, files, 32)).max() > 1e-3  # the view was used


def test_ensemble_with_refit_uses_the_refit_models(exported_student, shared_data, tmp_path):
    """With train.refit the submission came from full/: predict uses it, not the (here different) fold models."""
    from pipeline.lib.checkpoints import save_checkpoint
    from pipeline.lib.models import create_model

    models, ensemble = tmp_path / "models", tmp_path / "ensemble"
    other = create_model("resnet10t")
    torch.nn.init.normal_(other.get_classifier().weight)  # a fold model that disagrees with the refit one
    for k in (0, 1):
        (models / "resnet10t" / f"fold{k}").mkdir(parents=True)
        save_checkpoint(models / "resnet10t" / f"fold{k}" / "checkpoint.pt", other.eval(), arch="resnet10t",
                        params={"img_size": 32}, epoch=1, metric={})
    (models / "resnet10t" / "full").mkdir()
    shutil.copy(exported_student.student / "checkpoint.pt", models / "resnet10t" / "full" / "checkpoint.pt")
    ensemble.mkdir()
    blend = {"method": "mean", "weights": {"resnet10t": 1.0}, "threshold": 0.5}
    (ensemble / "scores.json").write_text(json.dumps({"blend": {"ensemble": blend, "ensemble_tta": blend},
                                                      "refit": {"on": True, "backbones": ["resnet10t"]}}))
    files = sorted((shared_data / "originals").rglob("*.png"))
    r = run_predict(*files, "--model", "ensemble", "--models", models, "--ensemble", ensemble)
    assert r.returncode == 0, r.stderr
    df = pd.read_csv(io.StringIO(r.stdout))
    np.testing.assert_allclose(df["prob"], pipeline_probs(exported_student.student, files, 32), atol=1e-4)


def test_cpu_predicts_in_batches_of_at_least_128_and_a_gpu_in_the_training_batch():
    """Bigger batches predict faster on a CPU; on a GPU the training batch is the one known to fit in memory."""
    from pipeline.lib.engine import EVAL_BATCH_CPU, loader

    ds = CellDataset(np.zeros((300, 8, 8, 3), np.uint8), targets(np.zeros(300)), lambda image: {"image": image})
    assert EVAL_BATCH_CPU == 128
    assert loader(ds, InferConfig(batch_size=32), torch.device("cpu")).batch_size == 128
    assert loader(ds, InferConfig(batch_size=256), torch.device("cpu")).batch_size == 256
    assert loader(ds, InferConfig(batch_size=32), torch.device("cuda")).batch_size == 32
