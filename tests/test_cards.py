"""pipeline.lib.cards: one tiny op on each visible CUDA card before training, with torch.cuda mocked (no GPU here): a card
the op fails on stops the run naming the card, its capability and the fix; the arch list alone decides nothing."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.lib import cards
from pipeline.lib import distributed as ddp
from pipeline.lib.common import PipelineError

NO_KERNEL = ("CUDA error: no kernel image is available for execution on the device\nCUDA kernel errors might be "
             "asynchronously reported at some other API call")
T4, P100, L4 = ("Tesla T4", (7, 5), None), ("Tesla P100-PCIE-16GB", (6, 0), NO_KERNEL), ("NVIDIA L4", (8, 9), None)


@pytest.fixture
def visible(monkeypatch):
    """Mock torch.cuda with these cards (name, capability, the error their op raises or None) and a CUDA 12.8 build's
    arch list, which has neither sm_60 nor sm_89."""
    def make(*cards_seen):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: bool(cards_seen))
        monkeypatch.setattr(torch.cuda, "device_count", lambda: len(cards_seen))
        index = lambda i: (i.index or 0) if isinstance(i, torch.device) else int(i or 0)  # torch takes either
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: cards_seen[index(i)][0])
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: cards_seen[index(i)][1])
        monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100"])
        ran = []

        def probe(i):
            ran.append(i)
            if cards_seen[i][2]:
                raise RuntimeError(cards_seen[i][2])

        monkeypatch.setattr(cards, "probe", probe)
        return ran

    return make


def test_every_card_runs_an_op(visible):
    ran = visible(T4, T4)
    rows = cards.require_usable_cards()
    assert ran == [0, 1]
    assert rows == [{"card": i, "name": "Tesla T4", "capability": "7.5", "error": None} for i in (0, 1)]


def test_a_card_without_kernels_stops_with_its_name_capability_and_the_fix(visible):
    visible(T4, P100)
    with pytest.raises(PipelineError) as e:
        cards.require_usable_cards()
    msg = str(e.value)
    for needed in ("CUDA card 1, Tesla P100-PCIE-16GB (capability 6.0)", "no kernel image is available",
                   "GPU T4 x2", "sm_60", "train.device: cpu", torch.__version__):
        assert needed in msg, msg
    assert "asynchronously" not in msg  # the error's first line only


def test_the_op_decides_not_the_arch_list(visible):
    """An L4 (8.9) is not in a CUDA 12.8 build's list, yet runs through its sm_80/sm_86 kernels: it is accepted."""
    visible(L4)
    assert cards.require_usable_cards()[0]["error"] is None


def test_no_card_no_op(visible):
    ran = visible()
    assert cards.require_usable_cards() == [] and ran == []


def test_the_training_stages_check_before_launching(visible):
    """train and distill ask processes_wanted how many processes to start: on CUDA it checks every card first."""
    visible(T4, T4)
    assert ddp.processes_wanted("auto", "auto") == 2
    visible(P100, T4)
    with pytest.raises(PipelineError, match="CUDA card 0, Tesla P100"):
        ddp.processes_wanted("auto", "auto")
    with pytest.raises(PipelineError, match="CUDA card 0, Tesla P100"):
        ddp.processes_wanted(1, "cuda")
    assert ddp.processes_wanted("auto", "cpu") == 1  # train.device: cpu never touches the cards


def test_the_command(visible, monkeypatch, caplog):
    visible()
    monkeypatch.setattr("sys.argv", ["cards", "--require-gpu"])
    with pytest.raises(PipelineError, match="No CUDA card is visible.*GPU T4 x2"):
        cards.main()
    monkeypatch.setattr("sys.argv", ["cards"])
    with caplog.at_level("INFO", logger="pipeline.lib.cards"):
        cards.main()
    assert "No CUDA card is visible" in caplog.text


def test_the_gpu_checks_environment_row_reports_it(visible, monkeypatch, tmp_path: Path):
    from pipeline.tools import gpusections

    visible(T4, P100)

    class Props:
        total_memory = 16 * 2**30

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i=0: Props())
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 91002)  # torch's own raises for an sm_60 card
    d = gpusections.environment(gpusections.Check(device=torch.device("cuda", 0), out=tmp_path))
    assert d["cards run an op"] == ("0 Tesla T4 (7.5): ok; 1 Tesla P100-PCIE-16GB (6.0): RuntimeError: CUDA error: no "
                                    "kernel image is available for execution on the device")
    assert d["failed"] is True


def test_the_real_ops_fail_cleanly_where_cuda_cannot_run(monkeypatch):
    """Not mocked: the probe's own ops on a card this torch cannot reach (here: no CUDA at all) raise, and the error
    becomes the one message."""
    if torch.cuda.is_available():
        pytest.skip("a real CUDA card is here: the mocked tests above cover a failing one")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "Tesla P100-PCIE-16GB")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: (6, 0))
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: [])
    with pytest.raises(PipelineError, match=r"CUDA card 0, Tesla P100-PCIE-16GB \(capability 6.0\), cannot run"):
        cards.require_usable_cards()
