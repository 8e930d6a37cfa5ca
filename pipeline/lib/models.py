"""Build timm backbones (pretrained from the hub or a local weights file, read weights only) and check they run."""
from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import timm
import torch

from pipeline.lib.common import PipelineError
from pipeline.lib.weights_only import UntrustedCheckpoint, read_checkpoint

log = logging.getLogger(__name__)

NUM_CLASSES = 2  # softmax over {uninfected, parasitized}: distillation's temperature acts on these logits
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


@dataclass(frozen=True)
class ModelSpec:
    """One network's settings, as params.yaml's train section gives them: what create_model builds."""
    backbone: str
    pretrained: bool = False
    weights_dir: str | None = None
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0

    @classmethod
    def from_params(cls, train: dict, backbone: str) -> "ModelSpec":
        return cls(backbone, pretrained=train["pretrained"], weights_dir=train["weights_dir"],
                   drop_rate=train["drop_rate"], drop_path_rate=train["drop_path_rate"])

    def create(self) -> torch.nn.Module:
        return create_model(self.backbone, pretrained=self.pretrained, weights_dir=self.weights_dir,
                            drop_rate=self.drop_rate, drop_path_rate=self.drop_path_rate)


def read_weights(path: Path) -> dict:
    """A pretrained state dict from a local file, never running code: safetensors, or read_checkpoint for .pth/.bin/
    .pt (timm 1.0.15, the oldest allowed, unpickles those in full). As timm's load_state_dict takes it: a checkpoint's
    EMA, state_dict or model entry, `module.` prefixes dropped."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path), device="cpu")
    else:
        state = read_checkpoint(path)
    if isinstance(state, dict):
        key = next((k for k in ("state_dict_ema", "model_ema", "state_dict", "model")
                    if isinstance(state.get(k), dict)), None)
        state = state[key] if key else state
    return timm.models.clean_state_dict(state)


def local_weights(arch: str, weights_dir: str | Path | None) -> Path | None:
    """A weights file for `arch` in weights_dir: <arch>.safetensors/.pth/.pt/.bin or <arch>/model.safetensors."""
    if not weights_dir:
        return None
    d = Path(weights_dir)
    candidates = [d / f"{arch}{s}" for s in WEIGHT_SUFFIXES] + [d / arch / f"model{s}" for s in WEIGHT_SUFFIXES]
    return next((p for p in candidates if p.is_file()), None)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers; timm would otherwise retry for ~47 s before failing offline."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def create_model(arch: str, *, pretrained: bool = False, weights_dir: str | Path | None = None,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0) -> torch.nn.Module:
    """A timm model with a 2-class head; pretrained weights come from weights_dir if there, else the hub."""
    if arch not in timm.list_models(pretrained=False):
        raise PipelineError(f"Unknown timm backbone {arch!r} in params.yaml; see `timm.list_models('resnet*')`.")
    kwargs = dict(num_classes=NUM_CLASSES, drop_rate=drop_rate)
    if drop_path_rate > 0:  # stochastic depth; only passed when on, as not every timm family takes it
        kwargs["drop_path_rate"] = drop_path_rate
    file = local_weights(arch, weights_dir) if pretrained else None
    if pretrained:
        if file is not None:
            log.info("%s: pretrained weights from %s", arch, file)
        elif not hub_reachable():
            raise PipelineError(
                f"train.pretrained is true but no weights for {arch} were found in train.weights_dir "
                f"({weights_dir}) and the Hugging Face hub cannot be reached. Either put the weights file there as "
                f"{arch}.safetensors (or .pth/.bin; e.g. downloaded on a machine with internet with "
                f"`timm.create_model('{arch}', pretrained=True)` and saved), or set `train.pretrained: false`.")
        else:
            log.info("%s: pretrained weights from the Hugging Face hub", arch)
    try:
        if file is not None:  # read here, handed to timm's load_pretrained (head dropped, filters) as a state dict
            kwargs["pretrained_cfg_overlay"] = dict(state_dict=read_weights(file))
        model = timm.create_model(arch, pretrained=pretrained, **kwargs)
    except UntrustedCheckpoint:
        raise
    except Exception as e:  # corrupt files raise torch, safetensors or timm errors of many kinds
        if not pretrained:
            raise
        raise PipelineError(f"Loading pretrained weights for {arch} failed: {type(e).__name__}: {e}. Check the file in "
                            f"train.weights_dir or set `train.pretrained: false`.") from None
    if not pretrained:
        zero_init_residuals(model)
    model.pretrained_cfg.pop("state_dict", None)  # the file's tensors, not kept alive beside the model's own
    # A new 2-class head starts at zero, so every backbone starts from the uninformed loss ln 2; timm's own
    # init for some families (EfficientNet: uniform +-1/sqrt(num_classes)) makes early logits huge.
    head = model.get_classifier()
    if isinstance(head, torch.nn.Linear):
        torch.nn.init.zeros_(head.weight)
        torch.nn.init.zeros_(head.bias)
    return model


def zero_init_residuals(model: torch.nn.Module) -> None:
    """Start every residual block of timm's EfficientNet/MobileNet builders (has_skip) as the identity, by zeroing its
    last BatchNorm's scale, as timm's ResNets do (zero_init_last): from scratch on few cells, an EfficientNet then
    learns from the first steps instead of fighting its own noise (docs/results.md, "EfficientNet-B0 from scratch")."""
    for m in model.modules():
        if getattr(m, "has_skip", False):
            norms = [c for c in m.children() if isinstance(c, torch.nn.BatchNorm2d)]
            if norms:
                torch.nn.init.zeros_(norms[-1].weight)


def data_config(model: torch.nn.Module) -> dict:
    """Mean/std the backbone was pretrained with (timm's pretrained config), used to normalise its inputs."""
    cfg = timm.data.resolve_model_data_config(model)
    return {"mean": tuple(cfg["mean"]), "std": tuple(cfg["std"])}


def check_model_name(arch: str, key: str) -> None:
    """Fail naming `key` unless timm knows `arch` (with the closest names it does know)."""
    if not timm.is_model(arch):
        import difflib

        close = difflib.get_close_matches(arch, timm.list_models(), n=4, cutoff=0.6)
        raise PipelineError(f"{key}: {arch!r} is not a timm model" +
                            (f"; close names: {', '.join(close)}." if close else "; see `timm.list_models('resnet*')`."))


def check_backbone(arch: str, img_size: int, key: str, drop_path_rate: float = 0.0, size_key: str = "data.img_size"
                   ) -> None:
    """Fail naming `key` unless timm knows `arch`, builds it with drop_path_rate and it runs at img_size (else name
    the smallest size that works)."""
    check_model_name(arch, key)
    try:
        model = create_model(arch, drop_path_rate=drop_path_rate).eval()
    except TypeError as e:  # e.g. DenseNet has no stochastic depth
        raise PipelineError(f"{key}: {arch} cannot be built with train.drop_path_rate {drop_path_rate} ({e}); set "
                            "train.drop_path_rate: 0 or choose another backbone.") from None

    def runs(size: int) -> bool:
        try:
            with torch.no_grad():
                model(torch.zeros(2, 3, size, size))
            return True
        except RuntimeError:  # "Kernel size can't be greater than actual input size" and kin
            return False

    if runs(img_size):
        return
    lo, hi = img_size, 1024  # bisect for the smallest size that runs, the first that fails being lo
    if not runs(hi):
        raise PipelineError(f"{key}: {arch} does not run at {size_key} {img_size} (nor at {hi}).")
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if runs(mid) else (mid, hi)
    raise PipelineError(f"{key}: {arch} cannot run at {size_key} {img_size}; the smallest size it runs at is "
                        f"{hi}. Raise data.img_size (or train.progressive) so every size is at least {hi}, or choose "
                        "another backbone.")
