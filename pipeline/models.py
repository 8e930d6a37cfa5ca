"""Build timm backbones (pretrained from the hub or a local file) and rebuild them from checkpoints, weights only."""
from __future__ import annotations

import logging
import os
import pickle
import re
import socket
from pathlib import Path

import timm
import torch

from pipeline.common import PipelineError, written_whole
from pipeline.fingerprint import file_digest

log = logging.getLogger(__name__)

NUM_CLASSES = 2  # softmax over {uninfected, parasitized}: distillation's temperature acts on these logits
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
# Set to 1 to load checkpoints and weights files that need more than tensors and plain types (full unpickling, which
# runs whatever code the file names). Off by default; an environment variable, never a param, so no run records it.
TRUST_ENV = "PIPELINE_TRUST_CHECKPOINTS"


class UntrustedCheckpoint(PipelineError):
    """A checkpoint or weights file that weights-only loading refused: unpickling it could run code."""

    def __init__(self, path: str | Path, reason: str):
        self.path, self.reason = Path(path), reason
        super().__init__(
            f"{path} was not loaded: {reason}. Every file this pipeline writes holds only tensors and plain types "
            f"(loaded weights only). If you trust its author, set {TRUST_ENV}=1 and re-run; "
            "otherwise delete it (`dvc repro` writes the pipeline's own again; pretrained weights are safest as "
            ".safetensors).")


def trusting_checkpoints() -> bool:
    return os.environ.get(TRUST_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def read_checkpoint(path: str | Path, *, mmap: bool = False):
    """torch.load of `path` onto the CPU, weights only (tensors and plain types). A file that needs anything else raises
    UntrustedCheckpoint, unless PIPELINE_TRUST_CHECKPOINTS=1 allows loading it in full; bytes that are no pickle
    torch.save writes raise a PipelineError saying so."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))  # torch's message is a page long, with terminal colours
    found = re.search(r"WeightsUnpickler error: *\n*(.+)", text)
    detail = (found.group(1) if found else text.splitlines()[0] if text else "").strip()
    if trusting_checkpoints():
        log.warning("%s is not weights only (%s); loading it in full, as %s=1 says you trust its author", path,
                    detail, TRUST_ENV)
        return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    if detail.startswith("Unsupported operand"):  # garbage, not a refused global
        raise PipelineError(f"{path} cannot be read: it is damaged or not a file torch.save wrote (torch: {detail}). "
                            "Delete it; `dvc repro` writes the pipeline's own again.") from None
    # Which globals the file names, read from its opcodes without running them (torch >= 2.5, zip files).
    try:
        names = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # older torch, or the legacy format: the first global torch refused
        names = re.findall(r"^Unsupported global: GLOBAL (\S+)", detail)
    raise UntrustedCheckpoint(path, f"it needs unpickling of {', '.join(names)}, which can run any code" if names
                              else f"torch's weights-only loader refused it ({detail})")


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


def weights_digest(arch: str, pretrained: bool, weights_dir: str | Path | None) -> str:
    """What the starting weights are, for resume fingerprints: none, a local file's sha256, or the hub's tag."""
    if not pretrained:
        return "none (from scratch)"
    file = local_weights(arch, weights_dir)
    if file is not None:
        return f"{file.name}:{file_digest(file)}"
    cfg = timm.models.get_pretrained_cfg(arch)
    return f"hub:{cfg.hf_hub_id if cfg is not None and cfg.hf_hub_id else arch}"


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
    last BatchNorm's scale, as timm's ResNets do (zero_init_last). From scratch on the demo's 572 cells per fold this
    lifted EfficientNet-B0's CV accuracy from 0.759 to 0.845 (3 folds, 5 epochs, 48 px, same seed)."""
    for m in model.modules():
        if getattr(m, "has_skip", False):
            norms = [c for c in m.children() if isinstance(c, torch.nn.BatchNorm2d)]
            if norms:
                torch.nn.init.zeros_(norms[-1].weight)


def data_config(model: torch.nn.Module) -> dict:
    """Mean/std the backbone was pretrained with (timm's pretrained config), used to normalise its inputs."""
    cfg = timm.data.resolve_model_data_config(model)
    return {"mean": tuple(cfg["mean"]), "std": tuple(cfg["std"])}


def save_checkpoint(path: Path, model: torch.nn.Module, *, arch: str, params: dict, epoch: int,
                    metric: dict, extra: dict | None = None) -> None:
    """A self-describing checkpoint: everything inference needs to rebuild the model, with the precision it trained in
    (engine.fit sets `trained_precision` on the model; predictions run in it where the device has it natively)."""
    state = model.state_dict()
    with written_whole(Path(path), sum(t.numel() * t.element_size() for t in state.values())) as tmp:
        torch.save({"arch": arch, "params": params, "epoch": epoch, "metric": metric, "data_config": data_config(model),
                    "precision": getattr(model, "trained_precision", "fp32"), "state_dict": state, **(extra or {})}, tmp)


def load_checkpoint(path: Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """Rebuild a model from a checkpoint written by save_checkpoint; returns (model in eval mode, channels_last as the
    pipeline feeds it, with `trained_precision` from the checkpoint; the checkpoint)."""
    if not Path(path).is_file():
        raise PipelineError(f"Checkpoint {path} is missing: run the stage that makes it (`dvc repro`).")
    ckpt = read_checkpoint(path)
    model = create_model(ckpt["arch"], pretrained=False)
    model.load_state_dict(ckpt["state_dict"])
    model.trained_precision = ckpt.get("precision", "fp32")  # older checkpoints: predicted in fp32
    return model.to(device).to(memory_format=torch.channels_last).eval(), ckpt


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
