"""Tests for the synthetic thin-smear cell dataset generator."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.lib.synthetic import make_synthetic

N_TRAIN, N_TEST, N_HIDDEN = 80, 30, 20
SPLIT_DIRS = ("train", "test", "hidden_test")


def _read_csv(path: Path) -> tuple[list[str], list[tuple[str, int]]]:
    with path.open(newline="") as fh:
        rows = list(csv.reader(fh))
    return rows[0], [(name, int(label)) for name, label in rows[1:]]


def _all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _dark_purple_fraction(path: Path) -> float:
    """Fraction of in-cell pixels that are much darker in green than the cell and bluish (chromatin-like)."""
    a = np.asarray(Image.open(path).convert("RGB")).astype(float)
    inside = a.sum(-1) > 150  # the background is black
    med_g = np.median(a[..., 1][inside])
    dark = inside & (a[..., 1] < 0.8 * med_g) & (a[..., 2] > a[..., 1] + 20)
    return float(dark.sum() / inside.sum())


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "nested" / "data"  # out_dir must be created if missing
    make_synthetic(out, n_train=N_TRAIN, n_test=N_TEST, n_hidden=N_HIDDEN, seed=123)
    return out


def test_layout_and_headers(dataset: Path) -> None:
    for d in SPLIT_DIRS:
        assert (dataset / d).is_dir()
    for csv_name in ("train_labels.csv", "test_labels.csv", "sample_submission.csv"):
        header, _ = _read_csv(dataset / csv_name)
        assert header == ["img_name", "label"]


def test_counts_and_csv_match_files(dataset: Path) -> None:
    for split, csv_name, n in (
        ("train", "train_labels.csv", N_TRAIN),
        ("test", "test_labels.csv", N_TEST),
        ("hidden_test", "sample_submission.csv", N_HIDDEN),
    ):
        files = sorted(p.name for p in (dataset / split).iterdir())
        assert len(files) == n
        assert all(f.endswith(".png") for f in files)
        _, rows = _read_csv(dataset / csv_name)
        names = [r[0] for r in rows]
        assert names == files  # one row per image, sorted by name
        assert {r[1] for r in rows} <= {0, 1}


def test_sample_submission_is_placeholder(dataset: Path) -> None:
    _, rows = _read_csv(dataset / "sample_submission.csv")
    assert [r[0] for r in rows] == sorted(p.name for p in (dataset / "hidden_test").iterdir())
    assert all(label == 0 for _, label in rows)


def test_names_unique_and_grouped_by_slide(dataset: Path) -> None:
    names = [p.name for d in SPLIT_DIRS for p in (dataset / d).iterdir()]
    assert len(names) == len(set(names)) == N_TRAIN + N_TEST + N_HIDDEN
    pattern = re.compile(r"^C\d+P\d+ThinF_IMG_\d{8}_\d{6}_cell_\d+\.png$")
    assert all(pattern.match(n) for n in names), [n for n in names if not pattern.match(n)][:3]
    groups = {d: {p.name.split("_IMG")[0] for p in (dataset / d).iterdir()} for d in SPLIT_DIRS}
    assert len(groups["train"]) >= 5
    # Like the competition, test cells come from slides that also appear in train.
    assert groups["train"] & groups["test"]


def test_both_labels_in_each_labelled_split(dataset: Path) -> None:
    for csv_name in ("train_labels.csv", "test_labels.csv"):
        _, rows = _read_csv(dataset / csv_name)
        labels = [r[1] for r in rows]
        assert set(labels) == {0, 1}
        assert 0.2 < np.mean(labels) < 0.8


def test_images_rgb_variable_size_black_corners(dataset: Path) -> None:
    sizes = []
    for d in SPLIT_DIRS:
        for p in (dataset / d).iterdir():
            with Image.open(p) as im:
                assert im.mode == "RGB"
                sizes.append(im.size)
                a = np.asarray(im)
            assert 56 <= im.size[0] <= 144 and 56 <= im.size[1] <= 144
            assert a[0, 0].sum() < 30 and a[-1, -1].sum() < 30  # black background outside the cell
            assert a[a.shape[0] // 2, a.shape[1] // 2].sum() > 300  # pale cell in the middle
    widths = {w for w, _ in sizes}
    assert len(widths) > 1
    assert any(w != h for w, h in sizes)


def test_size_range_respected(tmp_path: Path) -> None:
    make_synthetic(tmp_path, n_train=3, n_test=2, n_hidden=2, seed=1, min_size=40, max_size=40)
    for p in tmp_path.rglob("*.png"):
        with Image.open(p) as im:
            assert im.size == (40, 40)


def test_deterministic(tmp_path: Path) -> None:
    kwargs = dict(n_train=6, n_test=3, n_hidden=3)
    make_synthetic(tmp_path / "a", seed=7, **kwargs)
    make_synthetic(tmp_path / "b", seed=7, **kwargs)
    make_synthetic(tmp_path / "c", seed=8, **kwargs)
    a, b, c = (_all_files(tmp_path / x) for x in "abc")
    assert len(a) == 6 + 3 + 3 + 3
    assert a == b
    assert a != c
    pngs = lambda files: {v for k, v in files.items() if k.endswith(".png")}  # noqa: E731
    assert pngs(a).isdisjoint(pngs(c))  # a different seed changes the pixels, not just the names


def test_classes_differ_but_not_trivially(dataset: Path) -> None:
    stats, labels = [], []
    for split, csv_name in (("train", "train_labels.csv"), ("test", "test_labels.csv")):
        for name, label in _read_csv(dataset / csv_name)[1]:
            stats.append(_dark_purple_fraction(dataset / split / name))
            labels.append(label)
    s, y = np.array(stats), np.array(labels)
    # Parasites add dark purple chromatin: clearly more of it on average for label 1.
    assert s[y == 1].mean() > 5 * s[y == 0].mean() + 1e-3
    # ...but no threshold on this statistic separates the classes perfectly (faint parasites, distractors).
    best_acc = max(((s > t) == y).mean() for t in np.concatenate([[-1.0], np.unique(s)]))
    assert 0.7 <= best_acc < 0.99


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n_train=1, n_test=5, n_hidden=5), "n_train"),
        (dict(n_train=5, n_test=0, n_hidden=5), "n_test"),
        (dict(n_train=5, n_test=5, n_hidden=-3), "n_hidden"),
        (dict(n_train=5, n_test=5, n_hidden=5, min_size=100, max_size=50), "min_size"),
    ],
)
def test_invalid_args(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_synthetic(tmp_path / "out", seed=0, **kwargs)
    assert not (tmp_path / "out").exists()  # validation happens before anything is written
