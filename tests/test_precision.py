"""The training precision per device: native bf16 where the hardware has it, fp16 + GradScaler on older GPUs, fp32 else."""
from __future__ import annotations

import logging

import pytest
import torch

from pipeline.lib import precision
from pipeline.lib.common import PipelineError

CUDA, CPU = torch.device("cuda"), torch.device("cpu")


@pytest.mark.parametrize("card,capability,expected", [("T4", (7, 5), "fp16"), ("P100", (6, 0), "fp16"),
                                                      ("A100", (8, 0), "bf16"), ("H100", (9, 0), "bf16")])
def test_auto_on_gpus_students_get(card, capability, expected):
    assert precision.choose("auto", CUDA, "resnet18", capability=capability) == expected


def test_bf16_asked_on_a_gpu_without_it_warns(caplog):
    with caplog.at_level(logging.WARNING):
        assert precision.choose("bf16", CUDA, "resnet18", capability=(7, 5)) == "bf16"
    assert "no native bf16" in caplog.text


@pytest.mark.parametrize("arch,native,expected", [
    ("resnet10t", True, "bf16"), ("densenet121", True, "bf16"), ("efficientnet_b0", True, "fp32"),
    ("resnet10t", False, "fp32"), ("densenet121", False, "fp32")])
def test_auto_on_the_cpu_is_bf16_only_where_native_and_faster(arch, native, expected):
    assert precision.choose("auto", CPU, arch, native_cpu_bf16=native) == expected


def test_fp16_on_the_cpu_is_a_clear_error():
    with pytest.raises(PipelineError, match="train.precision is fp16"):
        precision.choose("fp16", CPU, "resnet10t", native_cpu_bf16=True)


def test_explicit_choices_are_kept():
    assert precision.choose("fp32", CPU, "resnet10t", native_cpu_bf16=True) == "fp32"
    assert precision.choose("fp32", CUDA, "resnet10t", capability=(9, 0)) == "fp32"


def test_autocast_contexts():
    ctx, scaler = precision.autocast("bf16", CPU)
    with ctx:
        y = torch.nn.Linear(4, 4)(torch.ones(2, 4))
    assert y.dtype == torch.bfloat16 and scaler is None
    ctx, scaler = precision.autocast("fp32", CPU)
    with ctx:
        assert torch.nn.Linear(4, 4)(torch.ones(2, 4)).dtype == torch.float32
    assert precision.autocast("fp16", CUDA)[1] is not None


@pytest.mark.parametrize("limit, native", [("AVX2", False), ("avx512_core", False), ("AVX512_CORE_BF16", None),
                                           ("AVX512_CORE_AMX", None), ("ALL", None), ("", None)])
def test_a_onednn_isa_limit_below_bf16_means_no_native_bf16(limit, native, monkeypatch, tmp_path):
    """ONEDNN_MAX_CPU_ISA=AVX2 (standing in for a laptop) makes bf16 emulated whatever /proc/cpuinfo says."""
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", limit)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    flags = tmp_path / "cpuinfo"
    flags.write_text("flags : avx2 avx512f avx512_bf16\n")
    real = precision.Path
    monkeypatch.setattr(precision, "Path", lambda p: flags if p == "/proc/cpuinfo" else real(p))
    assert precision.cpu_has_native_bf16() is (True if native is None else native)
