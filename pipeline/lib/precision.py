"""Training precision per device and backbone: fp32, bf16 autocast (native bf16 only) or fp16 with a GradScaler."""
from __future__ import annotations

import logging
import os
from contextlib import nullcontext
from pathlib import Path

import torch

from pipeline.lib.common import PipelineError

log = logging.getLogger(__name__)

# Backbone families whose training step is faster under CPU bf16 autocast on a CPU with native bf16; EfficientNet's
# depthwise convolutions are slower in it (docs/results.md, "bf16 against fp32").
CPU_BF16_FASTER = ("resnet", "densenet")
# oneDNN ISA limits (ONEDNN_MAX_CPU_ISA) that keep its native bf16 kernels.
BF16_ISAS = ("BF16", "AMX", "AVX10", "AVX512_CORE_FP16")


def cpu_has_native_bf16() -> bool:
    """Whether the CPU has bf16 instructions (AVX512-BF16 or AMX); without them bf16 is emulated and slow."""
    limit = os.environ.get("ONEDNN_MAX_CPU_ISA", os.environ.get("DNNL_MAX_CPU_ISA", "")).upper()
    if limit and limit not in ("ALL", "DEFAULT") and not any(n in limit for n in BF16_ISAS):
        return False  # oneDNN held below its bf16 kernels (e.g. AVX2, to stand in for a laptop): bf16 is emulated
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no cheap way to tell, so stay in fp32
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def native(device: torch.device) -> list[str]:
    """The precisions a device runs natively, worth timing: fp32, fp16 on CUDA, bf16 where the hardware has it."""
    if device.type == "cuda":
        return ["fp32", "fp16"] + (["bf16"] if torch.cuda.get_device_capability(device) >= (8, 0) else [])
    return ["fp32"] + (["bf16"] if device.type == "cpu" and cpu_has_native_bf16() else [])


def choose(requested: str, device: torch.device, arch: str, capability: tuple[int, int] | None = None,
           native_cpu_bf16: bool | None = None) -> str:
    """The precision to train with: `requested` (auto | fp32 | bf16 | fp16) resolved for this device and backbone."""
    if device.type == "cuda":
        capability = capability or torch.cuda.get_device_capability(device)
        native_bf16 = capability >= (8, 0)  # Ampere and newer; T4 (7.5) and P100 (6.0) only emulate bf16
        if requested == "auto":
            return "bf16" if native_bf16 else "fp16"
        if requested == "bf16" and not native_bf16:
            log.warning("train.precision is bf16 but this GPU (capability %d.%d) has no native bf16; it will be "
                        "slow. Use auto (fp16 with a GradScaler here).", *capability)
        return requested
    if device.type == "mps":  # fp32: no half-precision training path here has been shown right on Apple's GPU
        if requested in ("bf16", "fp16"):
            raise PipelineError(f"train.precision is {requested}, but on Apple's GPU (mps) the pipeline trains in "
                                "fp32; use auto or fp32.")
        return "fp32"
    native = cpu_has_native_bf16() if native_cpu_bf16 is None else native_cpu_bf16
    if requested == "fp16":
        raise PipelineError("train.precision is fp16, which needs a CUDA GPU; on the CPU use auto, fp32 or bf16.")
    if requested == "auto":
        return "bf16" if native and arch.startswith(CPU_BF16_FASTER) else "fp32"
    if requested == "bf16" and not native:
        log.warning("train.precision is bf16 but this CPU has no native bf16 (AVX512-BF16/AMX); it will be slow.")
    return requested


def for_inference(trained: str, device: torch.device) -> str:
    """The precision to predict in for a model trained in `trained`: the same where this device has it natively, else
    fp32 (always fp32 on the CPU, where a prediction pass is cheap and bf16 rounding moves probabilities by ~1e-3)."""
    if device.type != "cuda" or trained == "fp32":
        return "fp32"
    if trained == "bf16":
        return "bf16" if torch.cuda.get_device_capability(device) >= (8, 0) else "fp32"
    return trained  # fp16: every CUDA card runs it natively


def autocast(precision: str, device: torch.device):
    """The autocast context for a training step, and a GradScaler for fp16 (None otherwise)."""
    if precision == "fp32":
        return nullcontext(), None
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    return torch.autocast(device.type, dtype=dtype), scaler
