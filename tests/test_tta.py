"""TTA views (pipeline.lib.tta) and their use in pipeline.lib.engine.predict."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.lib.tta import apply_view
from pipeline.lib.views import CROPS, D4, expand_views


def square() -> torch.Tensor:
    """A 1x1x4x4 image with 16 distinct values: no non-trivial symmetry."""
    return torch.arange(16, dtype=torch.float32).reshape(1, 1, 4, 4)


def nonsquare() -> torch.Tensor:
    """A 1x3x5x7 image with distinct values per channel, row and column."""
    return torch.arange(3 * 5 * 7, dtype=torch.float32).reshape(1, 3, 5, 7)


def quadrants(h: int = 8, w: int = 8) -> torch.Tensor:
    """A piecewise-constant 1x1xhxw image: top-left 1, top-right 2, bottom-left 3, bottom-right 4."""
    x = torch.empty(1, 1, h, w)
    x[..., : h // 2, : w // 2] = 1
    x[..., : h // 2, w // 2:] = 2
    x[..., h // 2:, : w // 2] = 3
    x[..., h // 2:, w // 2:] = 4
    return x


# --- expand_views ---------------------------------------------------------------------------------------------------

def test_expand_d4_gives_the_8_distinct_views():
    views = expand_views(["d4"])
    assert len(views) == 8
    assert len(set(views)) == 8
    assert set(views) == {"identity", "hflip", "vflip", "rot90", "rot180", "rot270", "transpose", "antitranspose"}


def test_expand_five_crop_gives_5_crops():
    views = expand_views(["five_crop"])
    assert views == ["crop_center", "crop_tl", "crop_tr", "crop_bl", "crop_br"]


def test_expand_dedupes_and_keeps_first_occurrence_order():
    views = expand_views(["hflip", "d4", "identity", "five_crop", "crop_center", "hflip"])
    assert len(views) == len(set(views)) == 13
    assert views[0] == "hflip"
    assert views[1] == "identity"  # d4's first member, after the explicit hflip
    assert set(views) == set(D4) | set(CROPS)


def test_expand_single_names_pass_through():
    assert expand_views(["identity", "rot90"]) == ["identity", "rot90"]


@pytest.mark.parametrize("bad", ["rot45", "d8", "crop_middle", "Identity"])
def test_expand_rejects_unknown_name(bad):
    with pytest.raises(ValueError, match=repr(bad)):
        expand_views(["identity", bad])


def test_apply_view_rejects_unknown_name():
    with pytest.raises(ValueError, match="'sideways'"):
        apply_view(square(), "sideways")


# --- each view is the transform it names ------------------------------------------------------------------------------

def _np(x: torch.Tensor) -> np.ndarray:
    return x.numpy()


@pytest.mark.parametrize("make", [square, nonsquare], ids=["4x4", "5x7"])
def test_identity(make):
    x = make()
    np.testing.assert_array_equal(_np(apply_view(x, "identity")), _np(x))


@pytest.mark.parametrize("make", [square, nonsquare], ids=["4x4", "5x7"])
def test_hflip_reverses_width(make):
    x = make()
    y = apply_view(x, "hflip")
    np.testing.assert_array_equal(_np(y), _np(x)[..., ::-1])
    assert y[0, 0, 0, 0] == x[0, 0, 0, -1]


@pytest.mark.parametrize("make", [square, nonsquare], ids=["4x4", "5x7"])
def test_vflip_reverses_height(make):
    x = make()
    y = apply_view(x, "vflip")
    np.testing.assert_array_equal(_np(y), _np(x)[..., ::-1, :])
    assert y[0, 0, 0, 0] == x[0, 0, -1, 0]


@pytest.mark.parametrize("make", [square, nonsquare], ids=["4x4", "5x7"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_rotations_match_numpy_counter_clockwise(make, k):
    x = make()
    y = apply_view(x, f"rot{90 * k}")
    np.testing.assert_array_equal(_np(y), np.rot90(_np(x), k=k, axes=(-2, -1)))


def test_rot90_is_counter_clockwise_on_a_hand_example():
    # [[0, 1], [2, 3]] turned a quarter counter-clockwise: the top-right value moves to the top-left.
    x = torch.tensor([[0.0, 1.0], [2.0, 3.0]]).reshape(1, 1, 2, 2)
    np.testing.assert_array_equal(_np(apply_view(x, "rot90"))[0, 0], [[1.0, 3.0], [0.0, 2.0]])
    np.testing.assert_array_equal(_np(apply_view(x, "rot270"))[0, 0], [[2.0, 0.0], [3.0, 1.0]])


@pytest.mark.parametrize("make", [square, nonsquare], ids=["4x4", "5x7"])
def test_transpose_swaps_height_and_width(make):
    x = make()
    y = apply_view(x, "transpose")
    np.testing.assert_array_equal(_np(y), np.swapaxes(_np(x), -2, -1))


def test_antitranspose_reflects_across_the_anti_diagonal():
    x = square()
    n = x.shape[-1]
    y = apply_view(x, "antitranspose")
    a = _np(x)[0, 0]
    expected = np.empty_like(a)
    for i in range(n):
        for j in range(n):
            expected[n - 1 - j, n - 1 - i] = a[i, j]
    np.testing.assert_array_equal(_np(y)[0, 0], expected)


def test_antitranspose_nonsquare():
    x = nonsquare()
    h, w = x.shape[-2:]
    y = _np(apply_view(x, "antitranspose"))
    a = _np(x)
    assert y.shape == (1, 3, w, h)
    for i in range(h):
        for j in range(w):
            np.testing.assert_array_equal(y[0, :, w - 1 - j, h - 1 - i], a[0, :, i, j])


def test_d4_views_of_an_asymmetric_image_are_all_distinct():
    x = square()
    outs = [tuple(apply_view(x, v).flatten().tolist()) for v in D4]
    assert len(set(outs)) == 8


def test_d4_views_are_exactly_the_dihedral_group():
    x = square()
    a = _np(x)
    group = {tuple(np.rot90(b, k, axes=(-2, -1)).flatten().tolist()) for b in (a, a[..., ::-1]) for k in range(4)}
    assert {tuple(apply_view(x, v).flatten().tolist()) for v in D4} == group


def test_views_act_on_every_image_of_a_batch():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    for v in D4:
        batched = apply_view(x, v)
        for i in range(2):
            np.testing.assert_array_equal(_np(batched[i:i + 1]), _np(apply_view(x[i:i + 1], v)))


# --- crops --------------------------------------------------------------------------------------------------------

def test_crop_center_is_the_centre_block_upsampled():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 8, 8)
    y = apply_view(x, "crop_center", crop_scale=0.5)
    expected = F.interpolate(x[..., 2:6, 2:6], size=(8, 8), mode="bilinear", align_corners=False)
    assert y.shape == x.shape
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-6)
    assert not torch.allclose(y, x)


@pytest.mark.parametrize("view,value", [("crop_tl", 1), ("crop_tr", 2), ("crop_bl", 3), ("crop_br", 4)])
@pytest.mark.parametrize("h,w", [(8, 8), (6, 10)])
def test_corner_crops_take_their_corner(view, value, h, w):
    y = apply_view(quadrants(h, w), view, crop_scale=0.5)
    assert y.shape == (1, 1, h, w)
    torch.testing.assert_close(y, torch.full_like(y, float(value)), rtol=0, atol=1e-6)


def test_crop_center_of_quadrants_keeps_all_four():
    y = apply_view(quadrants(8, 8), "crop_center", crop_scale=0.5)[0, 0]
    assert y[0, 0] == 1 and y[0, -1] == 2 and y[-1, 0] == 3 and y[-1, -1] == 4


def test_crop_scale_is_used():
    torch.manual_seed(1)
    x = torch.rand(1, 3, 16, 16)
    a = apply_view(x, "crop_tl", crop_scale=0.5)
    b = apply_view(x, "crop_tl", crop_scale=0.875)
    assert a.shape == b.shape == x.shape
    assert not torch.allclose(a, b)
    torch.testing.assert_close(a, F.interpolate(x[..., :8, :8], size=(16, 16), mode="bilinear",
                                                align_corners=False), rtol=0, atol=1e-6)


# --- predict with views ---------------------------------------------------------------------------------------------

N_IMAGES, SIDE = 6, 16


@pytest.fixture(scope="module")
def dataset():
    from pipeline.lib.dataset import CellDataset
    from pipeline.lib.transforms import AugParams, build_transform

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(N_IMAGES, SIDE, SIDE, 3), dtype=np.uint8)
    tf = build_transform(False, AugParams(), mean=(0.5,) * 3, std=(0.5,) * 3)
    return CellDataset(images, np.zeros((N_IMAGES, 2), np.float32), tf)


@pytest.fixture(scope="module")
def cfg():
    from pipeline.lib.engine import InferConfig

    return InferConfig(batch_size=4, device="cpu")  # 6 images: a full and a partial batch


def batch(ds) -> torch.Tensor:
    return torch.stack([ds[i][0] for i in range(len(ds))])


def invariant_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2))


def asymmetric_model() -> nn.Module:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 2, 3, bias=False)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[:, :, 0, 0] = 1.0  # looks only up-left: not flip/rotation invariant
        conv.weight[:, :, 1, 2] = -0.5
    return nn.Sequential(conv, nn.Flatten(), nn.Dropout(0.5), nn.Linear(2 * (SIDE - 2) ** 2, 2))


def plain(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return F.softmax(model(x), 1)[:, 1].numpy()


@pytest.mark.parametrize("make", [invariant_model, asymmetric_model], ids=["invariant", "asymmetric"])
def test_predict_identity_is_the_plain_eval_prediction(dataset, cfg, make):
    from pipeline.lib.engine import predict

    model = make()
    model.train()  # predict must switch to eval mode (the asymmetric model has dropout)
    probs = predict(model, dataset, cfg, torch.device("cpu"), ["identity"], 0.875, "test")
    assert probs.shape == (N_IMAGES, 1)
    np.testing.assert_allclose(probs[:, 0], plain(make(), batch(dataset)), rtol=0, atol=1e-6)


def test_predict_d4_of_an_invariant_model_equals_the_plain_prediction(dataset, cfg):
    from pipeline.lib.engine import predict

    model = invariant_model()
    probs = predict(model, dataset, cfg, torch.device("cpu"), expand_views(["d4"]), 0.875, "test")
    assert probs.shape == (N_IMAGES, 8)
    ref = plain(invariant_model(), batch(dataset))
    assert np.ptp(ref) > 1e-3  # the images differ, so a wrong image order would show
    np.testing.assert_allclose(probs, np.repeat(ref[:, None], 8, 1), rtol=0, atol=1e-6)


def test_predict_views_of_a_non_invariant_model_differ(dataset, cfg):
    from pipeline.lib.engine import predict

    views = expand_views(["d4"])
    model = asymmetric_model()
    probs = predict(model, dataset, cfg, torch.device("cpu"), views, 0.875, "test")
    assert probs.shape == (N_IMAGES, 8)
    ident, hflip = probs[:, views.index("identity")], probs[:, views.index("hflip")]
    assert np.abs(ident - hflip).max() > 1e-4
    # Each column is the model applied to that view of the batch.
    x = batch(dataset)
    for v in views:
        np.testing.assert_allclose(probs[:, views.index(v)], plain(asymmetric_model(), apply_view(x, v)),
                                   rtol=0, atol=1e-6)


def test_predict_passes_crop_scale(dataset, cfg):
    from pipeline.lib.engine import predict

    x = batch(dataset)
    for scale in (0.5, 0.75):
        probs = predict(asymmetric_model(), dataset, cfg, torch.device("cpu"), ["crop_br"], scale, "test")
        np.testing.assert_allclose(probs[:, 0], plain(asymmetric_model(), apply_view(x, "crop_br", scale)),
                                   rtol=0, atol=1e-6)


@pytest.mark.parametrize("view", D4 + CROPS)
@pytest.mark.parametrize("size", [8, 13])
def test_numpy_views_equal_torch_views(view, size):
    """`pipeline.predict` applies the views to numpy batches for ONNX Runtime: the same numbers as on tensors."""
    x = torch.rand(3, 3, size, size, generator=torch.Generator().manual_seed(size))
    np.testing.assert_allclose(apply_view(x.numpy(), view, 0.75), apply_view(x, view, 0.75).numpy(), atol=1e-6)


@pytest.mark.parametrize("view", ["crop_tl+hflip", "scale_88", "scale_112", "rot90+crop_br"])
def test_composite_and_scale_views_agree_between_numpy_and_torch(view):
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    np.testing.assert_allclose(apply_view(x.numpy(), view), apply_view(x, view).numpy(), atol=1e-6)


def test_ten_crop_is_five_crops_and_their_mirrors():
    views = expand_views(["ten_crop"])
    assert len(views) == 10 and views[:5] == CROPS
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    for crop in CROPS:
        np.testing.assert_array_equal(apply_view(x, f"{crop}+hflip").numpy(), apply_view(x, crop).flip(-1).numpy())
    assert len({tuple(apply_view(x, v).flatten().tolist()) for v in views}) == 10


def test_multi_scale_resizes_the_batch():
    x = torch.rand(2, 3, 48, 48)
    assert expand_views(["multi_scale"]) == ["identity", "scale_88", "scale_112"]
    assert apply_view(x, "scale_88").shape == (2, 3, 42, 42) and apply_view(x, "scale_112").shape == (2, 3, 54, 54)


@pytest.mark.parametrize("bad", ["scale_300", "scale_x", "hflip+sideways"])
def test_bad_composite_or_scale_names_are_rejected(bad):
    with pytest.raises(ValueError, match="unknown TTA view"):
        expand_views([bad])
