"""Stage `validate`: check all of params.yaml (schema, backbones that exist and run at data.img_size) before any work."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from pipeline.batch_aug import progressive_size
from pipeline.common import run_main
from pipeline.models import check_backbone, check_model_name
from pipeline.params import load_params

log = logging.getLogger(__name__)


def validate(params_file: Path) -> dict:
    """The checked params; raises a PipelineError naming the first bad key."""
    params = load_params(params_file)
    t = params["train"]
    # The smallest side a model sees: the first epoch's under progressive resizing, else data.img_size.
    size = progressive_size(1, t["epochs"], params["data"]["img_size"], t["progressive"])
    size_key = "data.img_size" if t["progressive"] >= 1 else "the first epoch's size (train.progressive)"
    for i, name in enumerate(t["backbones"]):
        check_backbone(name, size, f"train.backbones[{i}]", t["drop_path_rate"], size_key)
    check_backbone(params["distill"]["student"], size, "distill.student", t["drop_path_rate"], size_key)
    for name in t["lr_by_backbone"]:  # a misspelt name would silently leave its model at train.lr
        check_model_name(name, "train.lr_by_backbone")
        if name not in (*t["backbones"], params["distill"]["student"]):
            log.warning("train.lr_by_backbone.%s applies to no model of this run (not in train.backbones, not "
                        "distill.student)", name)
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
