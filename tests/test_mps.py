"""Apple silicon's GPU (torch's MPS backend), with the backend mocked: this project has not run on a Mac."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.lib import distributed as ddp
from pipeline.lib import engine
from pipeline.lib import precision as amp_precision
from pipeline.lib.common import PipelineError
from pipeline.lib.params import Params, load_params
from helpers import train_cfg

MPS = torch.device("mps")


@pytest.fixture
def mac(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)


def test_auto_picks_apples_gpu_where_there_is_no_cuda(mac):
    assert engine.resolve_device("auto") == MPS and engine.resolve_device("mps") == MPS


def test_mps_asked_for_without_it_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(PipelineError, match="train.device is mps but torch has no Apple GPU"):
        engine.resolve_device("mps")


def test_mps_trains_in_fp32_and_refuses_half_precision(mac):
    assert amp_precision.choose("auto", MPS, "resnet18") == "fp32"
    for requested in ("bf16", "fp16"):
        with pytest.raises(PipelineError, match="on Apple's GPU .mps. the pipeline trains in fp32"):
            amp_precision.choose(requested, MPS, "resnet18")
    assert amp_precision.for_inference("fp32", MPS) == "fp32"


def test_mps_uses_no_pinned_memory_and_no_worker_processes(mac):
    ds = torch.utils.data.TensorDataset(torch.zeros(4, 3, 8, 8), torch.zeros(4, 2))
    cfg = train_cfg(batch_size=2, num_workers="auto", device="mps")
    for loader in (engine.train_loader(ds, cfg, MPS), engine.loader(ds, cfg, MPS)):
        assert not loader.pin_memory and loader.num_workers == 0


def test_several_processes_on_mps_are_refused(mac):
    with pytest.raises(PipelineError, match="train.gpus is 2, but Apple's GPU .mps. is one device"):
        ddp.processes_wanted(2, "mps")
    with pytest.raises(PipelineError, match="is one device"):
        ddp.processes_wanted(2, "auto")
    assert ddp.processes_wanted("auto", "mps") == 1


def test_params_accept_mps_and_refuse_its_half_precision(tmp_path):
    import yaml

    p = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    p["train"].update(device="mps", precision="auto")
    Params.model_validate(p)
    p["train"]["precision"] = "fp16"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(p))
    with pytest.raises(PipelineError, match="train.precision.*mps.*fp32"):
        load_params(tmp_path / "params.yaml")
