"""Stage `validate`: check all of params.yaml (schema, backbones that exist and run at data.img_size) before any work."""
from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path

import yaml

from pipeline.lib.batch_aug import progressive_size
from pipeline.lib.common import PipelineError, path_overlap, run_main
from pipeline.lib.models import check_backbone, check_model_name
from pipeline.lib.params import load_params

log = logging.getLogger(__name__)


def outputs(dvc_yaml: Path, params: dict | None = None) -> list[Path]:
    """Every stage's outputs as dvc.yaml names them, relative to its folder: a params key in a name is filled in from
    `params` (default: the params.yaml beside it, as DVC does), another template leaves the name's folder."""
    if params is None:
        beside = dvc_yaml.parent / "params.yaml"
        params = (yaml.safe_load(beside.read_text()) or {}) if beside.is_file() else {}

    def fill(match: re.Match) -> str:
        node = params
        for part in match.group(1).split("."):
            node = node.get(part) if isinstance(node, dict) else None
        return str(node) if isinstance(node, (str, int, float)) else match.group(0)

    out = set()
    for stage in (yaml.safe_load(dvc_yaml.read_text()) or {}).get("stages", {}).values():
        for entry in (*stage.get("outs", []), *stage.get("metrics", []), *stage.get("plots", [])):
            name = re.sub(r"\$\{([^}]+)\}", fill, next(iter(entry)) if isinstance(entry, dict) else entry)
            if "${" in name:  # data/models/${item.backbone} -> data/models; data/timing/train-${..}.json -> data/timing
                name = name[:name.index("${")].rsplit("/", 1)[0]
            out.add(dvc_yaml.parent / name)
    return sorted(out)


def check_data_path(data: dict, dvc_yaml: Path, params: dict | None = None) -> None:
    """Refuse a local data.path inside, equal to or above an output: DVC deletes a stage's outputs before running it
    (the user's zip in data/raw is gone), and a folder above one is copied into itself."""
    if data["source"] != "local" or not data.get("path") or not dvc_yaml.is_file():
        return
    path = Path(data["path"]).expanduser()
    for output in outputs(dvc_yaml, params):
        if relation := path_overlap(path, output):
            raise PipelineError(
                f"data.path {data['path']} is {relation} {output.relative_to(dvc_yaml.parent)}, which the pipeline "
                "writes (DVC deletes a stage's outputs before it runs, and a folder above one would be copied into "
                "itself): move your data outside the pipeline's outputs (e.g. beside the project, or data/mine/) and "
                "set data.path there.")


def validate(params_file: Path, dvc_yaml: Path | None = None) -> dict:
    """The checked params; raises a PipelineError naming the first bad key."""
    params = load_params(params_file)
    check_data_path(params["data"], dvc_yaml or Path(params_file).parent / "dvc.yaml", params)
    t = params["train"]
    # The smallest side a model sees: the first epoch's under progressive resizing, else data.img_size.
    first = lambda epochs: progressive_size(1, epochs, params["data"]["img_size"], t["progressive"])
    size, size_key = first(t["epochs"]), ("data.img_size" if t["progressive"] >= 1
                                          else "the first epoch's size (train.progressive)")
    for i, name in enumerate(t["backbones"]):
        check_backbone(name, first(t["epochs_by_backbone"].get(name, t["epochs"])), f"train.backbones[{i}]",
                       t["drop_path_rate"], size_key)
    check_backbone(params["distill"]["student"], size, "distill.student", t["drop_path_rate"], size_key)
    for name in t["lr_by_backbone"]:  # a misspelt name would silently leave its model at train.lr
        check_model_name(name, "train.lr_by_backbone")
        if name not in (*t["backbones"], params["distill"]["student"]):
            log.warning("train.lr_by_backbone.%s applies to no model of this run (not in train.backbones, not "
                        "distill.student)", name)
    for name in t["epochs_by_backbone"]:  # the same for train.epochs
        check_model_name(name, "train.epochs_by_backbone")
        if name not in t["backbones"]:
            log.warning("train.epochs_by_backbone.%s applies to no teacher of this run (not in train.backbones; the "
                        "student's epochs are distill.epochs)", name)
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
