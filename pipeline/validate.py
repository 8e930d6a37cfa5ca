"""Stage `validate`: check all of params.yaml (schema, backbones that exist and run at data.img_size) before any work."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from pipeline.common import run_main
from pipeline.models import check_backbone
from pipeline.params import load_params

log = logging.getLogger(__name__)


def validate(params_file: Path) -> dict:
    """The checked params; raises a PipelineError naming the first bad key."""
    params = load_params(params_file)
    size = params["data"]["img_size"]
    for i, name in enumerate(params["train"]["backbones"]):
        check_backbone(name, size, f"train.backbones[{i}]")
    check_backbone(params["distill"]["student"], size, "distill.student")
    return params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml", type=Path)
    parser.add_argument("--out", required=True, type=Path, help="a marker file the other stages depend on")
    args = parser.parse_args()
    params = validate(args.params)
    log.info("%s is valid: %d backbones and the student run at %d px", args.params, len(params["train"]["backbones"]),
             params["data"]["img_size"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # The same bytes for every valid params.yaml, so a param change re-runs only the stages that read it.
    args.out.write_text("params.yaml passed `python -m pipeline.validate`\n")


if __name__ == "__main__":
    run_main(main)
