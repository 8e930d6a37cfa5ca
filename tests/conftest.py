"""Shared fixtures: the real NIH samples in ../shared/data and tiny synthetic datasets to corrupt."""
from __future__ import annotations

import os

# Keep third-party libraries offline and quiet; set before anything imports them.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from helpers import dvc, project_copy, run_outputs, tiny_params, train_cfg  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PREPARED_SIZE = 32  # img_size for the shared prepared samples: small keeps the session fast

# Parallel workers (pytest.ini: pytest-xdist's -n auto, --dist loadgroup, which hands out one test at a time in
# collection order): the longest files first, a short one between the two longest, so no long file starts last.
FIRST = ["test_e2e", "test_kills", "test_kaggle_notebook", "test_params", "test_ddp", "test_train", "test_gpucheck"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(FIRST)))


def share_the_cores() -> None:
    """In an xdist worker: this process and its children (the stages, torch's threads) keep to this worker's share of
    the cores, so two workers training at once do not oversubscribe them."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER"), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if not worker or count < 2 or not hasattr(os, "sched_setaffinity"):
        return
    cores = sorted(os.sched_getaffinity(0))
    mine = cores[int(worker.removeprefix("gw")) % count::count]
    if mine:
        os.sched_setaffinity(0, mine)


share_the_cores()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data beside the checkout (real NIH cell images; never copied into the repo)."""
    path = (REPO.parent / "shared" / "data").resolve()
    if not path.is_dir():
        pytest.skip(f"../shared/data not found: expected the real NIH samples in {path}")
    return path


@dataclass
class Prepared:
    """One sample after download + prepare: the raw folder, the prepared folder and what prepare wrote."""
    raw: Path
    out: Path
    df: pd.DataFrame  # what prepare() returned
    index: pd.DataFrame  # index.csv as read back
    images: np.ndarray  # images.npy
    img_size: int


def run_download_prepare(src: Path, work: Path, *, img_size: int = PREPARED_SIZE, holdout: float = 0.15,
                         seed: int = 42) -> Prepared:
    """download(source='local') then prepare(), as the DVC stages run them."""
    from pipeline.download import download
    from pipeline.prepare import prepare

    raw, out = work / "raw", work / "prepared"
    download(raw, source="local", path=str(src), competition="", dataset="", synthetic={}, seed=seed)
    df = prepare(raw, out, img_size=img_size, holdout_fraction=holdout, seed=seed)
    return Prepared(raw, out, df, pd.read_csv(out / "index.csv"), np.load(out / "images.npy"), img_size)


@pytest.fixture(scope="session")
def download_prepare() -> Callable[..., Prepared]:
    """run_download_prepare, for tests (importing from conftest breaks if tests/ becomes a package)."""
    return run_download_prepare


@pytest.fixture(scope="session")
def nndl_prepared(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Prepared:
    """The competition-layout sample (nested zips), extracted and prepared once per session (~5 s)."""
    zip_path = shared_data / "nndl-hw2-sample.zip"
    if not zip_path.is_file():
        pytest.skip(f"../shared/data not found: {zip_path} is missing")
    return run_download_prepare(zip_path, tmp_path_factory.mktemp("nndl"))


@pytest.fixture
def make_competition(tmp_path: Path) -> Callable[..., Path]:
    """Factory: a tiny synthetic competition-layout dataset (train/, test/, hidden_test/ + CSVs) to corrupt.

    Returns the raw folder; call it again with another `name` for a second, independent copy.
    """
    from pipeline.lib.synthetic import make_synthetic

    def make(name: str = "raw", *, n_train: int = 12, n_test: int = 6, n_hidden: int = 6, seed: int = 0,
             n_slides: int = 6) -> Path:
        root = tmp_path / name
        make_synthetic(root, n_train=n_train, n_test=n_test, n_hidden=n_hidden, seed=seed, n_slides=n_slides,
                       min_size=24, max_size=40)
        return root

    return make


@dataclass
class Exported:
    """A student trained briefly on the real competition sample, its checkpoint and the export stage's outputs."""
    prepared: Prepared
    student: Path  # folder with checkpoint.pt, as the distill stage writes it
    export: Path  # the export stage's folder
    scores: dict  # export/scores.json


@pytest.fixture(scope="session")
def exported_student(nndl_prepared: Prepared, tmp_path_factory: pytest.TempPathFactory) -> Exported:
    """resnet10t trained 2 epochs on the sample's 3,000 training cells at 32 px (~15 s), then exported (~10 s): built
    once per test session, the xdist workers sharing one folder (the tests only read it)."""
    import json

    from filelock import FileLock

    shared = os.environ.get("PYTEST_XDIST_WORKER") is not None
    work = (tmp_path_factory.getbasetemp().parent if shared else tmp_path_factory.mktemp("x")) / "exported"
    with FileLock(f"{work}.lock"):
        if not (work / "export" / "scores.json").is_file():
            _export_a_student(nndl_prepared, work)
    return Exported(nndl_prepared, work / "student", work / "export",
                    json.loads((work / "export/scores.json").read_text()))


def _export_a_student(nndl_prepared: Prepared, work: Path) -> None:
    import shutil

    import torch

    from pipeline.lib.dataset import CellDataset, split_rows, targets
    from pipeline.lib.engine import fit
    from pipeline.export import export
    from pipeline.lib.losses import LabelLoss
    from pipeline.lib.checkpoints import save_checkpoint
    from pipeline.lib.models import create_model, data_config
    from pipeline.lib.transforms import AugParams, build_transform
    from pipeline.lib.tta import TTASpec

    shutil.rmtree(work, ignore_errors=True)  # a worker killed while building it
    work.mkdir(parents=True)
    torch.manual_seed(0)
    model = create_model("resnet10t")
    rows = split_rows(nndl_prepared.index, "train")
    labels = nndl_prepared.index["label"].to_numpy(float)[rows]
    aug = AugParams(affine=0, color=0, blur=0, noise=0, dropout=0)
    ds = CellDataset(nndl_prepared.images[rows], targets(labels), build_transform(True, aug, **data_config(model)))
    cfg = train_cfg(epochs=2, batch_size=64, lr=3e-3, ema_decay=0, select_best=False, num_workers=0, device="cpu")
    fit(model, ds, None, None, LabelLoss(0.0), cfg, work)
    student = work / "student"
    student.mkdir()
    save_checkpoint(student / "checkpoint.pt", model.eval(), arch="resnet10t", params={"img_size": PREPARED_SIZE},
                    epoch=2, metric={})
    export(nndl_prepared.out, student, work / "export", tta=TTASpec(("identity", "hflip", "crop_center"), 0.875))


@dataclass
class TinyChain:
    """One uninterrupted `dvc repro` of helpers.tiny_params: the project (test_e2e goes on to change it) and the
    digests of its outputs, taken right after the run."""
    project: Path
    outputs: dict[str, str]


@pytest.fixture(scope="session")
def tiny_chain(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> TinyChain:
    project = project_copy(tmp_path_factory.mktemp("tiny"), **tiny_params(shared_data))
    dvc(project, "repro")
    return TinyChain(project, run_outputs(project))
