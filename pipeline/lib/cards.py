"""Whether this torch runs on every visible CUDA card: tiny ops on each (`python -m pipeline.tools.cards` lists them)."""
from __future__ import annotations

import argparse
import logging

import torch

from pipeline.lib.common import PipelineError, run_main

log = logging.getLogger(__name__)


def probe(index: int) -> None:
    """Two tiny ops on card `index`, waited for: an elementwise one (a torch build without kernels for the card fails
    with "no kernel image is available") and a convolution (cuDNN 9.11 and later refuse cards below sm_75). An
    arch-list lookup alone would also refuse cards that run through PTX or a same-major build (Colab's L4 on an sm_80
    build), so the ops decide."""
    device = torch.device("cuda", index)
    x = torch.arange(16, dtype=torch.float32, device=device)
    (x * 2 + 1).sum().item()
    torch.nn.functional.conv2d(x.view(1, 1, 4, 4), torch.ones(1, 1, 3, 3, device=device)).sum().item()


def cards() -> list[dict]:
    """Each visible CUDA card: index, name, capability ("7.5") and the error its tiny ops raised (None: they ran)."""
    rows = []
    for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        error = None
        try:
            probe(i)
        except Exception as e:  # torch raises RuntimeError (AcceleratorError in newer builds) for a missing kernel
            error = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
        rows.append({"card": i, "name": torch.cuda.get_device_name(i),
                     "capability": "%d.%d" % torch.cuda.get_device_capability(i), "error": error})
    return rows


def unusable_message(row: dict) -> str:
    """What to do about a card this torch cannot run on."""
    sm = "sm_" + row["capability"].replace(".", "")
    return (f"CUDA card {row['card']}, {row['name']} (capability {row['capability']}), cannot run this torch "
            f"{torch.__version__} (built for CUDA {torch.version.cuda}, kernels {' '.join(torch.cuda.get_arch_list())}):"
            f" {row['error']}. On Kaggle choose the accelerator \"GPU T4 x2\" (PyTorch's CUDA 12.8 and later builds, "
            f"Kaggle's among them, have no kernels for the P100's sm_60); elsewhere install a torch build whose "
            f"kernels and cuDNN include {sm}, hide the card with CUDA_VISIBLE_DEVICES, or set train.device: cpu.")


def require_usable_cards() -> list[dict]:
    """The visible cards, after tiny ops on each; a PipelineError naming the first card that cannot run them."""
    rows = cards()
    for row in rows:
        if row["error"]:
            raise PipelineError(unusable_message(row))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--require-gpu", action="store_true", help="fail when no CUDA card is visible")
    args = parser.parse_args()
    rows = require_usable_cards()
    for row in rows:
        log.info("CUDA card %d: %s (capability %s) runs torch %s", row["card"], row["name"], row["capability"],
                 torch.__version__)
    if not rows and args.require_gpu:
        raise PipelineError("No CUDA card is visible: the pipeline would train on the CPU, for hours on the "
                            "competition's data. On Kaggle choose the accelerator \"GPU T4 x2\" (Settings → "
                            "Accelerator); to run on the CPU anyway, leave out --require-gpu (in notebooks/kaggle.ipynb: "
                            "REQUIRE_GPU = False).")
    if not rows:
        log.info("No CUDA card is visible (torch %s): training runs on the CPU", torch.__version__)


if __name__ == "__main__":
    run_main(main)
