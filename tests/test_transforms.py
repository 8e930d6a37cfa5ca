"""build_transform / AugParams (pipeline.lib.transforms) and per-sample seeding in CellDataset."""
from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline.lib.dataset import CellDataset
from pipeline.lib.transforms import AugParams, build_transform

REPO = Path(__file__).resolve().parent.parent
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
PROBS = ("flip", "affine", "color", "blur", "noise", "dropout")
ALL_ON = AugParams(**dict.fromkeys(PROBS, 1.0))
ALL_OFF = AugParams(**dict.fromkeys(PROBS, 0.0))


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    """An asymmetric uint8 64x64x3 image: a bright blob off-centre on a noisy background."""
    rng = np.random.default_rng(0)
    img = rng.integers(0, 120, size=(64, 64, 3), dtype=np.uint8)
    img[10:30, 8:40] = (200, 120, 180)
    return img


def run(tf, image: np.ndarray, seed: int | None = None) -> torch.Tensor:
    if seed is not None:
        tf.set_random_seed(seed)
    return tf(image=image.copy())["image"]


@pytest.mark.parametrize("train,aug", [(False, AugParams()), (True, AugParams()), (True, ALL_ON), (True, ALL_OFF)],
                         ids=["eval", "train-default", "train-all-p1", "train-all-p0"])
def test_builds_and_runs_without_warnings(image, train, aug):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tf = build_transform(train, aug, MEAN, STD)
        for seed in range(20):
            x = run(tf, image, seed)
            assert isinstance(x, torch.Tensor)
            assert x.dtype == torch.float32
            assert tuple(x.shape) == (3, 64, 64)  # CHW
            assert torch.isfinite(x).all()


def test_eval_output_is_normalised_chw(image):
    x = run(build_transform(False, AugParams(), MEAN, STD), image)
    expected = (image.astype(np.float32) / 255 - np.array(MEAN, np.float32)) / np.array(STD, np.float32)
    np.testing.assert_allclose(x.numpy(), expected.transpose(2, 0, 1), rtol=0, atol=1e-5)


def test_eval_of_the_mean_colour_is_about_zero():
    const = np.empty((64, 64, 3), np.uint8)
    const[:] = np.round(255 * np.array(MEAN)).astype(np.uint8)
    x = run(build_transform(False, AugParams(), MEAN, STD), const)
    assert x.abs().max().item() < 0.01
    white = run(build_transform(False, AugParams(), MEAN, STD), np.full((64, 64, 3), 255, np.uint8))
    for c in range(3):
        assert white[c].mean().item() == pytest.approx((1 - MEAN[c]) / STD[c], abs=1e-5)


def test_eval_ignores_augmentation_strengths(image):
    a = run(build_transform(False, ALL_ON, MEAN, STD), image, 0)
    b = run(build_transform(False, AugParams(), MEAN, STD), image, 1)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_train_with_all_probabilities_0_equals_eval(image):
    ev = run(build_transform(False, AugParams(), MEAN, STD), image)
    tf = build_transform(True, ALL_OFF, MEAN, STD)
    for seed in range(5):
        torch.testing.assert_close(run(tf, image, seed), ev, rtol=0, atol=0)


def test_train_with_all_probabilities_1_changes_the_image(image):
    ev = run(build_transform(False, AugParams(), MEAN, STD), image)
    tf = build_transform(True, ALL_ON, MEAN, STD)
    for seed in range(5):
        assert (run(tf, image, seed) - ev).abs().max().item() > 0.1


@pytest.mark.parametrize("op", PROBS)
def test_each_augmentation_changes_the_image(image, op):
    ev = run(build_transform(False, AugParams(), MEAN, STD), image)
    tf = build_transform(True, dataclasses.replace(ALL_OFF, **{op: 1.0}), MEAN, STD)
    changed = [(run(tf, image, seed) - ev).abs().max().item() > 1e-3 for seed in range(5)]
    # The flips can compose to the identity (e.g. h+v flip then a 180-degree turn); most draws change the image.
    assert sum(changed) >= 3, changed


def test_flips_give_a_d4_view_of_the_image(image):
    ev = run(build_transform(False, AugParams(), MEAN, STD), image)
    views = [torch.rot90(v, k, dims=(1, 2)) for v in (ev, ev.flip(2)) for k in range(4)]
    tf = build_transform(True, dataclasses.replace(ALL_OFF, flip=1.0), MEAN, STD)
    seen = set()
    for seed in range(8):
        x = run(tf, image, seed)
        match = [i for i, v in enumerate(views) if torch.equal(x, v)]
        assert len(match) == 1
        seen.add(match[0])
    assert len(seen) > 1


def test_affine_strengths_are_used(image):
    ev = run(build_transform(False, AugParams(), MEAN, STD), image)
    still = dataclasses.replace(ALL_OFF, affine=1.0, shift=0.0, scale=0.0, rotate=0.0)
    torch.testing.assert_close(run(build_transform(True, still, MEAN, STD), image, 0), ev, rtol=0, atol=1e-6)
    moving = dataclasses.replace(still, rotate=30.0)
    assert (run(build_transform(True, moving, MEAN, STD), image, 0) - ev).abs().max().item() > 0.1


def test_aug_params_match_params_yaml():
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    assert {f.name for f in dataclasses.fields(AugParams)} == set(params["augment"])
    aug = AugParams(**params["augment"])  # what the stages do
    for k, v in params["augment"].items():
        assert getattr(aug, k) == v


# --- CellDataset seeding ------------------------------------------------------------------------------------------

@pytest.fixture
def images(image) -> np.ndarray:
    return np.stack([image, image[::-1].copy(), image])


def dataset(images, seed: int = 3) -> CellDataset:
    return CellDataset(images, np.zeros((len(images), 2), np.float32), build_transform(True, ALL_ON, MEAN, STD),
                       seed=seed)


def test_dataset_same_seed_and_epoch_gives_identical_tensors(images):
    a, b = dataset(images), dataset(images)
    for ds in (a, b):
        ds.epoch = 2
    first = a[0][0]
    torch.testing.assert_close(a[0][0], first, rtol=0, atol=0)  # re-reading the same sample
    torch.testing.assert_close(b[0][0], first, rtol=0, atol=0)  # a fresh dataset with the same seed
    a[1], a[2]  # reading other samples in between must not matter
    torch.testing.assert_close(a[0][0], first, rtol=0, atol=0)


def test_dataset_epoch_seed_and_index_change_the_augmentation(images):
    ds = dataset(images)
    ds.epoch = 1
    first = ds[0][0]
    ds.epoch = 2
    assert not torch.equal(ds[0][0], first)
    other_seed = dataset(images, seed=4)
    other_seed.epoch = 1
    assert not torch.equal(other_seed[0][0], first)
    ds.epoch = 1
    assert not torch.equal(ds[2][0], first)  # the same image at another index
    torch.testing.assert_close(ds[0][0], first, rtol=0, atol=0)


def test_dataset_returns_targets_as_float_rows(images):
    targets = np.array([[1, 0.9], [0, 0.2], [1, 0.6]], np.float32)
    ds = CellDataset(images, targets, build_transform(False, AugParams(), MEAN, STD))
    x, y = ds[1]
    assert y.dtype == torch.float32
    np.testing.assert_allclose(y.numpy(), [0, 0.2])
    assert len(ds) == 3
