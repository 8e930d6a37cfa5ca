"""The one schema of params.yaml (types, ranges, choices, a line of doc per key) and the loader every stage uses."""
from __future__ import annotations

import difflib
import json
import re
import sys
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from pydantic.fields import FieldInfo

from pipeline.lib.common import PipelineError, batch_split_problem
from pipeline.lib.views import expand_views



class Section(BaseModel):
    # strict: "0.002" (a string) is not a number; extra keys are typos, reported with the closest known key.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Synthetic(Section):
    n_train: int = Field(ge=10, description="generated training cells")
    n_test: int = Field(ge=2, description="generated labelled test cells")
    n_hidden: int = Field(ge=1, description="generated hidden cells")


class Data(Section):
    source: Literal["demo", "local", "kaggle", "synthetic"] = Field(
        description="demo (1,000 real cells in the repo), local (data.path), kaggle (the API) or synthetic (generated)")
    path: str = Field(description="source=local: the competition zip/folder or the public cell_images zip/folder")
    competition: str = Field(min_length=1, description="Kaggle competition slug (download and submit)")
    dataset: str = Field(description="source=kaggle: a Kaggle dataset to download instead of the competition")
    img_size: int = Field(ge=16, le=1024, description="side of the cached square images, in pixels")
    holdout: float = Field(gt=0, lt=1, description="data without a labelled test set: fraction held out, by slide")
    train_on_test: bool = Field(description="the final fit: the labelled test images join training too; their "
                                            "scores are then marked seen (test_seen) and no gate uses them")
    seed: int = Field(ge=0, description="seed of the synthetic data and of the holdout")
    synthetic: Synthetic = Field(description="source=synthetic: how many cells per split")

    @field_validator("path")
    @classmethod
    def _path_for_local(cls, path: str, info: ValidationInfo) -> str:
        if info.data.get("source") == "local" and not path.strip():
            raise ValueError("data.source is local, so data.path must name the competition zip or folder (or the "
                             "public cell_images zip)")
        return path


class Folds(Section):
    n: int = Field(description="cross-validation folds (at least 2), each backbone training every fold; 0 = no CV: "
                               "each backbone trains once on every training cell for train.epochs and keeps the last")
    group_by: Literal["patient", "none"] = Field(
        description="patient: no slide in two folds (StratifiedGroupKFold); none: StratifiedKFold")
    seed: int = Field(ge=0, description="seed of the fold assignment")

    @field_validator("n")
    @classmethod
    def _at_least_two(cls, n: int) -> int:
        if n == 1 or n < 0:
            raise ValueError("cross-validation needs at least 2 folds (5 is usual); for one model per backbone on "
                             "every training cell, without CV, set 0")
        return n


class Train(Section):
    backbones: list[str] = Field(min_length=1, description="timm model names; each trains on every fold")
    epochs: int = Field(ge=1, le=1000, description="maximum epochs per (backbone, fold); folds.n 0: the epochs of "
                                                   "each backbone's one model, which keeps the last")
    batch_size: int = Field(ge=2, le=8192, description="images per step over all processes (the global batch): each "
                                                       "of train.gpus' processes takes an equal share, at least 2 "
                                                       "(BatchNorm)")
    lr: float = Field(gt=0, le=1, description="peak AdamW learning rate (warmup, then cosine decay to lr/100)")
    lr_by_backbone: dict[str, Annotated[float, Field(gt=0, le=1)]] = Field(
        description="peak learning rate for these timm names (teacher or student), instead of train.lr")
    epochs_by_backbone: dict[str, Annotated[int, Field(ge=1, le=1000)]] = Field(
        description="epochs for these teachers' timm names, instead of train.epochs (the student's are "
                    "distill.epochs)")
    weight_decay: float = Field(ge=0, le=1, description="AdamW weight decay")
    warmup_epochs: float = Field(ge=0, description="linear warmup, in epochs")
    label_smoothing: float = Field(ge=0, lt=0.5, description="label smoothing of the cross-entropy")
    grad_clip: float = Field(gt=0, description="max gradient norm")
    ema_decay: float = Field(ge=0, lt=1, description="EMA of the weights (with warmup); the EMA model is kept")
    patience: int = Field(ge=1, description="early stopping of fold models: epochs without a better validation AUC "
                                            "(folds.n 0: no validation, so no effect; the last epoch is kept)")
    refit: bool = Field(description="after CV, retrain each backbone on every training cell for the folds' mean kept "
                                    "epochs; its test/hidden predictions replace the fold average (folds.n 0: no "
                                    "effect, each model already learns every cell)")
    drop_rate: float = Field(ge=0, lt=1, description="dropout before the classifier")
    drop_path_rate: float = Field(ge=0, lt=1, description="stochastic depth: max rate of dropping a residual "
                                                           "branch (0 = off)")
    mixup: float = Field(ge=0, le=10, description="mixup: Beta alpha of the mixing weight (0 = off); labels and "
                                                  "distillation targets mix with the images")
    cutmix: float = Field(ge=0, le=10, description="CutMix: Beta alpha of the pasted area (0 = off); with mixup on "
                                                   "too, each takes half the batches")
    progressive: float = Field(gt=0, le=1, description="progressive resizing: first epoch at this fraction of "
                                                       "data.img_size, full size from the middle epoch (1 = off)")
    pretrained: Union[bool, list[str]] = Field(
        description="start from ImageNet weights (train.weights_dir, else the HF hub): true for every model (teachers "
                    "and student), false for none, or a list of the timm names that do")
    weights_dir: str = Field(min_length=1, description="folder of local pretrained weights, one file per backbone named after it (.safetensors/.pth/.bin)")
    device: Literal["auto", "cpu", "cuda", "mps"] = Field(
        description="auto: a CUDA GPU when one is visible, else Apple's GPU (mps) where torch has it, else the CPU")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        description="auto: bf16 on GPUs with native bf16, else fp16; on CPUs with native bf16 for backbones "
                    "measured faster in it (ResNet, DenseNet), else fp32. Predictions on the CPU stay fp32")
    num_workers: Union[Literal["auto"], Annotated[int, Field(ge=0, le=256)]] = Field(
        description="DataLoader augmentation workers (kept across epochs); auto: 0 on the CPU (they fight torch's "
                    "threads for the cores), on a GPU one per core of the process, at most 8")
    gpus: Union[Literal["auto"], Annotated[int, Field(ge=1, le=1024)]] = Field(
        description="processes training each model with DDP (torchrun, launched by the stage): auto = every "
                    "visible GPU (1 on the CPU); on the CPU a number > 1 uses gloo. A finished model is reused at "
                    "any count")
    sync_bn: bool = Field(description="DDP: BatchNorm statistics over all processes' batches (SyncBatchNorm)")
    compile: Union[Literal["auto"], bool] = Field(
        description="torch.compile the training step's model: auto = off (not yet shown to pay on a CPU or a GPU); "
                    "true needs a C++ compiler on the CPU (else it trains uncompiled, with a warning)")
    seed: int = Field(ge=0, description="root seed; per-(backbone, fold) seeds derive from it")

    @field_validator("precision")
    @classmethod
    def _fp16_needs_cuda(cls, precision: str, info: ValidationInfo) -> str:
        if precision == "fp16" and info.data.get("device") == "cpu":
            raise ValueError("fp16 needs a CUDA GPU; with train.device cpu use auto, fp32 or bf16")
        if precision in ("fp16", "bf16") and info.data.get("device") == "mps":
            raise ValueError("on Apple's GPU (mps) the pipeline trains in fp32; use auto or fp32")
        return precision

    @field_validator("gpus")
    @classmethod
    def _batch_splits(cls, gpus: str | int, info: ValidationInfo) -> str | int:
        # train.gpus auto is checked once the stage knows the count (pipeline.lib.distributed.local_batch).
        if isinstance(gpus, int) and "batch_size" in info.data and (
                problem := batch_split_problem(info.data["batch_size"], gpus)):
            raise ValueError(problem)
        return gpus

    @field_validator("backbones")
    @classmethod
    def _unique(cls, names: list[str]) -> list[str]:
        if len(set(names)) != len(names):
            raise ValueError("a backbone is listed twice")
        return names


class Augment(Section):
    flip: float = Field(ge=0, le=1, description="p of each of horizontal flip, vertical flip, random 90-degree rotation")
    affine: float = Field(ge=0, le=1, description="p of a random shift/scale/rotate")
    shift: float = Field(ge=0, le=0.5, description="max shift, fraction of the side")
    scale: float = Field(ge=0, lt=1, description="zoom in [1 - scale, 1 + scale]")
    rotate: float = Field(ge=0, le=180, description="max rotation, degrees")
    color: float = Field(ge=0, le=1, description="p of brightness/contrast and of hue/saturation jitter")
    brightness: float = Field(ge=0, le=1, description="max brightness change")
    contrast: float = Field(ge=0, le=1, description="max contrast change")
    hue: int = Field(ge=0, le=90, description="max hue shift, OpenCV units (180 = full circle)")
    saturation: int = Field(ge=0, le=255, description="max saturation shift")
    blur: float = Field(ge=0, le=1, description="p of a light Gaussian blur")
    noise: float = Field(ge=0, le=1, description="p of light Gaussian noise")
    dropout: float = Field(ge=0, le=1, description="p of coarse dropout (1-3 black holes of 5-15% of the side)")


class Distill(Section):
    student: str = Field(min_length=1, description="timm name of the student distilled from the ensemble")
    epochs: int = Field(ge=1, le=1000, description="student epochs on every training image (it keeps its last)")
    alpha: float = Field(ge=0, le=1, description="loss = alpha * CE(label) + (1 - alpha) * T² * KL(teacher ‖ student)")
    temperature: float = Field(gt=0, le=100, description="T: softens teacher and student distributions")
    teacher: Literal["ensemble", "ensemble_tta"] = Field(description="the ensemble OOF column used as soft target")
    unlabelled: Literal["none", "hidden", "hidden_and_test"] = Field(
        description="semi-supervised: the student also learns the ensemble's probabilities on the hidden images "
                    "(never their labels); hidden_and_test adds the labelled test images unlabelled, which makes "
                    "the student's test score transductive")
    label_noise: Literal["keep", "drop"] = Field(
        description="drop: the student leaves out the training cells whose label the ensemble's OOF probabilities "
                    "confidently contradict (cleanlab's confident learning); keep: learns them all. Either way "
                    "data/student/label_issues.csv lists the flagged cells")
    timing_images: int = Field(ge=1, description="test images used to time student vs ensemble inference")


class Tta(Section):
    views: list[str] = Field(min_length=1, description="views averaged at test time: names, a+b, scale_<percent>, or the groups d4, five_crop, ten_crop, multi_scale")
    crop_scale: float = Field(gt=0, le=1, description="crop views keep this fraction of the side")

    @field_validator("views")
    @classmethod
    def _known_views(cls, views: list[str]) -> list[str]:
        expand_views(views)  # raises ValueError naming the unknown view and the known ones
        return views


class Params(Section):
    data: Data
    folds: Folds
    train: Train
    augment: Augment
    distill: Distill
    tta: Tta


def schema_keys(model: type[BaseModel] = Params, prefix: str = "") -> dict[str, str]:
    """Every leaf key of the schema, dotted, with its one-line doc."""
    out = {}
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out.update(schema_keys(ann, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = field.description or ""
    return out


def map_keys(model: type[BaseModel] = Params, prefix: str = "") -> set[str]:
    """The dotted keys whose value is a map of names (their entries are the user's, not the schema's)."""
    out = set()
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out |= map_keys(ann, f"{prefix}{name}.")
        elif get_origin(ann) is dict:
            out.add(f"{prefix}{name}")
    return out


def _allowed(field) -> str:
    """What a field accepts, in words: its choices, or its type and range."""
    ann = field.annotation
    if get_origin(ann) is Literal:
        return " \\| ".join(f"`{a}`" for a in get_args(ann))
    if get_origin(ann) is Union:  # a choice or a number, e.g. auto | integer ≥ 0
        return " \\| ".join(_allowed(FieldInfo.from_annotation(a)) for a in get_args(ann))
    if get_origin(ann) is dict:  # e.g. train.lr_by_backbone: its values' range
        return f"map of timm name: {_allowed(FieldInfo.from_annotation(get_args(ann)[1]))}"
    name = {int: "integer", float: "number", bool: "true/false", str: "text"}.get(ann, "list of names")
    bounds = []
    for m in field.metadata:
        for attr, sign in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<")):
            if getattr(m, attr, None) is not None:
                bounds.append(f"{sign} {getattr(m, attr)}")
    return f"{name} {', '.join(bounds)}".strip()


def params_table(values: dict, model: type[BaseModel] = Params, prefix: str = "") -> list[str]:
    """Markdown rows `| key | value | allowed | meaning |` for every leaf key (docs/params.md)."""
    rows = []
    for name, field in model.model_fields.items():
        ann, value = field.annotation, values.get(name)
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows += params_table(value or {}, ann, f"{prefix}{name}.")
        else:
            shown = ", ".join(map(str, value)) if isinstance(value, list) else json.dumps(value)
            rows.append(f"| `{prefix}{name}` | `{shown}` | {_allowed(field)} | {field.description} |")
    return rows


def _known_at(loc: tuple) -> list[str]:
    """The keys allowed at a location of the schema (for 'did you mean')."""
    model: Any = Params
    for part in loc[:-1]:
        model = model.model_fields[part].annotation
    return list(model.model_fields)


# How pydantic names the branch of a Union a value failed (train.pretrained: bool or list of names).
_UNION_BRANCH = re.compile(r"^(bool|int|float|str|list\[.*\]|dict\[.*\]|literal\[.*\]|constrained-.*)$")


def describe(e: ValidationError, file: str | Path) -> str:
    """One line per problem: the dotted key, the value, what is allowed (or the closest known key)."""
    lines, union = [], {}
    for err in e.errors(include_url=False):
        loc = tuple(str(p) for p in err["loc"])
        if loc and _UNION_BRANCH.match(loc[-1]):  # one problem per branch of a choice: said once, branches joined
            key = ".".join(loc[:-1])
            if key in union:
                lines[union[key]] += f", or {err['msg'].removeprefix('Input should be ')}"
                continue
            union[key] = len(lines)
            lines.append(f"{key}: {err.get('input')!r} is not allowed: {err['msg']}")
            continue
        key = ".".join(loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            close = difflib.get_close_matches(loc[-1], _known_at(loc), n=1, cutoff=0.5)
            hint = f"; did you mean {'.'.join((*loc[:-1], close[0]))}?" if close else \
                f"; known keys here: {', '.join(_known_at(loc))}"
            lines.append(f"{key}: unknown key{hint}")
        elif err["type"] == "missing":
            lines.append(f"{key}: missing; add it (see docs/params.md)")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"{key}: {err.get('input')!r} is not allowed: {msg}")
    return f"{file}: " + (lines[0] if len(lines) == 1 else f"{len(lines)} problems:\n  " + "\n  ".join(lines))


class _Yaml12Floats(yaml.SafeLoader):
    """PyYAML reads `1e-3` as a string (YAML 1.1 wants `1.0e-3`); DVC and YAML 1.2 read a number, so do we."""


_Yaml12Floats.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$|^[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?$"
               r"|^[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."))


def load_params(path: str | Path = "params.yaml") -> dict:
    """params.yaml checked against the schema, as plain typed values; a PipelineError names every bad key."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path} is missing; run from the project's root folder (where dvc.yaml is).")
    try:
        raw = yaml.load(path.read_text(), Loader=_Yaml12Floats)
    except yaml.YAMLError as e:
        raise PipelineError(f"{path} is not valid YAML: {e}") from None
    try:
        return Params.model_validate(raw or {}).model_dump()
    except ValidationError as e:
        raise PipelineError(describe(e, path)) from None


def with_overrides(params: dict, sets: list[str], source: str = "--set") -> dict:
    """params with `key=value` overrides (dotted keys, YAML values), checked against the schema, as `dvc exp run -S`
    (Hydra) reads them: `+key=value` adds a map's entry, `~key` removes one, a map value merges into the map."""
    out = json.loads(json.dumps(params))
    for item in sets:
        op = "++" if item.startswith("++") else item[0] if item[:1] in ("+", "~") else ""
        key, sep, value = item[len(op):].partition("=")
        *path, leaf = key.split(".")
        node = out
        for part in path:
            node = node.get(part) if isinstance(node, dict) else None
        in_map = ".".join(path) in map_keys()  # e.g. train.lr_by_backbone.densenet121
        # +key adds a map's entry, ++key adds or overrides it (a preset run twice in one workspace), ~key removes it.
        if not isinstance(node, dict) or (op and not in_map) or (op == "~") == bool(sep) or (
                op in ("+", "~") and (leaf in node) == (op == "+")) or (not op and leaf not in node):
            raise PipelineError(f"{source} {item!r}: expected key=value with a key of params.yaml, e.g. train.mixup=0.2"
                                " (a new entry of a map: +train.lr_by_backbone.resnet18=0.001, or ++ to add or override; remove one: "
                                "~train.lr_by_backbone.densenet121)")
        if op == "~":
            del node[leaf]
            continue
        new = yaml.load(value, Loader=_Yaml12Floats)
        node[leaf] = {**node[leaf], **new} if isinstance(new, dict) and isinstance(node.get(leaf), dict) else new
    try:
        return Params.model_validate(out).model_dump()
    except ValidationError as e:
        raise PipelineError(describe(e, source)) from None


if __name__ == "__main__":
    # `python -m pipeline.lib.params`: the table in docs/params.md, from this schema and params.yaml.
    print("| key | value | allowed | meaning |\n|---|---|---|---|")
    print("\n".join(params_table(load_params(sys.argv[1] if len(sys.argv) > 1 else "params.yaml"))))
