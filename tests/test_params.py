"""params.yaml against its one schema: every bad value stops before any work with a message naming the key."""
from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.lib.common import PipelineError
from pipeline.lib.params import load_params, map_keys, params_table, schema_keys, with_overrides
from pipeline.validate import main as validate_main
from helpers import with_value

ROOT = Path(__file__).resolve().parents[1]
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())


def run_validate(params: dict, tmp_path: Path, monkeypatch, capsys) -> tuple[int, str]:
    """`python -m pipeline.validate` in-process (what the first DVC stage runs): its exit code and log."""
    from pipeline.lib.common import run_main

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["validate", "--out", "validated.txt"])
    try:
        run_main(validate_main)
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


BAD = [  # key, bad value, words the message must hold besides the key
    ("train.epochs", 0, ["0", "greater than or equal to 1"]),
    ("train.epochs", "ten", ["'ten'", "valid integer"]),
    ("train.lr", "0.002", ["'0.002'", "valid number"]),
    ("train.lr", -0.1, ["-0.1", "greater than 0"]),
    ("train.batch_size", 1, ["1", "greater than or equal to 2"]),
    ("train.device", "gpu", ["'gpu'", "'auto', 'cpu', 'cuda' or 'mps'"]),
    ("train.pretrained", "yes", ["'yes'", "boolean"]),
    ("data.source", "s3", ["'s3'", "'demo', 'local', 'kaggle' or 'synthetic'"]),
    ("data.img_size", 8, ["8", "greater than or equal to 16"]),
    ("folds.n", 1, ["1", "at least 2 folds"]),
    ("folds.group_by", "slide", ["'slide'", "'patient' or 'none'"]),
    ("tta.views", ["identity", "sideways"], ["'sideways'", "the groups d4, five_crop, ten_crop, multi_scale"]),
    ("distill.teacher", "best", ["'best'", "'ensemble' or 'ensemble_tta'"]),
    ("augment.flip", 1.5, ["1.5", "less than or equal to 1"]),
    ("train.backbones", ["resnet10tt"], ["'resnet10tt' is not a timm model", "resnet10t"]),
    ("distill.student", "efficientnet_b00", ["not a timm model", "efficientnet_b0"]),
    ("train.lr_by_backbone", {"densenet-121": 0.002}, ["'densenet-121' is not a timm model", "densenet121"]),
    ("train.backbones", ["inception_v3"], [f"inception_v3 cannot run at data.img_size {PARAMS['data']['img_size']}",
                                           "smallest size it runs at is 75"]),
]


@pytest.mark.parametrize("key,value,words", BAD, ids=[f"{k}={v}" for k, v, _ in BAD])
def test_a_bad_value_stops_with_one_message_naming_the_key(key, value, words, tmp_path, monkeypatch, capsys):
    code, err = run_validate(with_value(key, value), tmp_path, monkeypatch, capsys)
    assert code == 1
    assert "Traceback" not in err
    shown = key.replace("train.backbones", "train.backbones[0]")
    assert f"{shown}: " in err, err
    for w in words:
        assert w in err, err
    assert not (tmp_path / "validated.txt").exists()


def test_a_misspelled_key_names_the_closest_known_key(tmp_path, monkeypatch, capsys):
    params = copy.deepcopy(PARAMS)
    params["train"]["epoch"] = params["train"].pop("epochs")
    code, err = run_validate(params, tmp_path, monkeypatch, capsys)
    assert code == 1 and "train.epoch: unknown key; did you mean train.epochs?" in err


def test_local_source_needs_a_path(tmp_path, monkeypatch, capsys):
    code, err = run_validate(with_value("data.source", "local"), tmp_path, monkeypatch, capsys)
    assert code == 1 and "data.path: '' is not allowed" in err


def test_the_shipped_params_are_valid(tmp_path, monkeypatch, capsys):
    code, err = run_validate(PARAMS, tmp_path, monkeypatch, capsys)
    assert code == 0, err
    assert (tmp_path / "validated.txt").read_text() == "params.yaml passed `python -m pipeline.validate`\n"


def test_stages_get_typed_values(tmp_path):
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(with_value("augment.rotate", 20)))
    assert isinstance(load_params(tmp_path / "p.yaml")["augment"]["rotate"], float)


def leaves(node, prefix=""):
    if isinstance(node, dict) and prefix not in MAP_KEYS:
        return {k for key, sub in node.items() for k in leaves(sub, f"{prefix}{key}.")}
    return {prefix[:-1]}


MAP_KEYS = {f"{key}." for key in map_keys()}  # keys whose value is a map of names: a leaf of the schema


def test_schema_params_yaml_and_params_reference_agree():
    keys = schema_keys()
    assert leaves(PARAMS) == set(keys), "params.yaml and the schema have different keys"
    assert all(keys.values()), "every schema key needs a one-line description"
    reference = (ROOT / "docs" / "params.md").read_text()
    missing = [row for row in params_table(load_params(ROOT / "params.yaml")) if row not in reference]
    assert not missing, ("docs/params.md's table is stale; paste `python -m pipeline.lib.params`:\n"
                         + "\n".join(missing))
    # Every key line of params.yaml carries a comment (the sections' headers and list items aside).
    text = (ROOT / "params.yaml").read_text()
    for key in keys:
        leaf = key.split(".")[-1]
        lines = [ln for ln in text.splitlines() if ln.strip().startswith(f"{leaf}:")]
        assert any("#" in ln for ln in lines), f"params.yaml: {key} has no comment"


def test_a_fresh_clone_has_the_eight_top_level_names(tmp_path):
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    top = {Path(f).parts[0] for f in tracked}
    for name in ("pipeline", "data", "notebooks", "submissions", "params.yaml", "dvc.yaml", "requirements.txt",
                 "README.md"):
        assert name in top, f"{name} is not in git, so a fresh clone lacks it"


def test_yaml_1_2_numbers_are_numbers(tmp_path):
    text = (ROOT / "params.yaml").read_text().replace("lr: 0.003 ", "lr: 3e-3  ")
    assert "lr: 3e-3" in text
    (tmp_path / "params.yaml").write_text(text)
    assert load_params(tmp_path / "params.yaml")["train"]["lr"] == 0.003  # PyYAML alone reads the string '3e-3'


@pytest.mark.parametrize("key,value,words", [
    ("train.drop_path_rate", 0.1, ["train.backbones[2]: densenet121 cannot be built with train.drop_path_rate 0.1"]),
    ("train.precision", "fp16", []),
])
def test_combinations_that_cannot_run_are_stopped(key, value, words, tmp_path, monkeypatch, capsys):
    params = with_value(key, value)
    if key == "train.precision":
        params = with_value("train.device", "cpu", params)
        words = ["train.precision: 'fp16' is not allowed: fp16 needs a CUDA GPU"]
    code, err = run_validate(params, tmp_path, monkeypatch, capsys)
    assert code == 1 and all(w in err for w in words), err


def test_progressive_resizing_checks_the_smallest_size(tmp_path, monkeypatch, capsys):
    params = with_value("train.backbones", ["inception_v3"], with_value("data.img_size", 96))
    assert run_validate(params, tmp_path, monkeypatch, capsys)[0] == 0
    code, err = run_validate(with_value("train.progressive", 0.5, params), tmp_path, monkeypatch, capsys)
    assert code == 1 and "cannot run at the first epoch's size (train.progressive) 48" in err, err


def readme_presets() -> dict[str, list[str]]:
    """The preset commands (`dvc exp run -n NAME -S key=value ...`) of README.md and docs/guide.md, by name."""
    text = "\n".join((ROOT / page).read_text() for page in ("README.md", "docs/guide.md"))
    commands = re.findall(r"^dvc exp run -n ([\w-]+)((?: \\\n?\s*-S \S+)+|(?: -S \S+)+)", text, re.M)
    return {name: re.findall(r"-S (\S+)", args) for name, args in commands}


def test_readme_presets_are_valid_params(tmp_path):
    """Each preset's `-S key=value` list, applied to params.yaml as DVC does, passes the schema."""
    presets = readme_presets()
    assert {"laptop", "gpu-fast", "full", "gpu", "kaggle"} <= set(presets), f"presets found: {sorted(presets)}"
    assert not {"quick", "cpu", "lite0"} & set(presets), "removed presets (docs/results.md, History) are back"
    for name, sets in presets.items():
        params = yaml.safe_load((ROOT / "params.yaml").read_text())
        for kv in sets:
            key = kv.split("=", 1)[0].lstrip("+")
            assert key in schema_keys() or key.rsplit(".", 1)[0] in map_keys(), f"preset {name}: {key} is not a params key"
        if any(kv.startswith("data.source=local") for kv in sets) and not any(kv.startswith("data.path=") for kv in sets):
            sets = [*sets, "data.path=x.zip"]
        with_overrides(params, sets, f"preset {name}")  # as `dvc exp run -S` reads them; raises naming the bad key


def test_a_bad_lr_by_backbone_value_names_its_entry(tmp_path, monkeypatch, capsys):
    code, err = run_validate(with_value("train.lr_by_backbone", {"densenet121": 0}), tmp_path, monkeypatch, capsys)
    assert code == 1 and "train.lr_by_backbone.densenet121: 0 is not allowed: Input should be greater than 0" in err


def test_lr_by_backbone_sets_one_models_lr_and_fingerprint_only():
    from pipeline.lib import checkpoints
    from pipeline.lib.training import for_backbone, train_config

    params = with_value("train.lr_by_backbone", {"densenet121": 0.002})
    dense, res = for_backbone(params, "densenet121"), for_backbone(params, "resnet10t")
    assert train_config(dense["train"], 0).lr == 0.002 and train_config(res["train"], 0).lr == params["train"]["lr"]
    # Another backbone's entry is not part of a model's fingerprint: changing DenseNet's lr does not retrain ResNet.
    other = with_value("train.lr_by_backbone", {"densenet121": 0.001})
    learned = lambda p, name: checkpoints.learned_params(for_backbone(p, name), checkpoints.TEACHER_PARAMS)
    assert learned(params, "resnet10t") == learned(other, "resnet10t")
    assert learned(params, "densenet121") != learned(other, "densenet121")
    assert "train.lr_by_backbone" not in learned(params, "densenet121")
    # The train stage's fingerprints come through Teacher.from_params, which resolves the map itself.
    from pipeline.lib.teachers import Teacher

    kept = Teacher.from_params(params, "densenet121").learned
    assert kept["train.lr"] == 0.002 and not any(k.startswith("train.lr_by_backbone") for k in kept)


def test_overrides_read_a_map_as_dvc_exp_run_does():
    """`dvc exp run -S` (Hydra): +key adds a map's entry, ~key removes one, a map value merges; with_overrides agrees."""
    from pipeline.lib.params import with_overrides

    lrs = lambda *sets: with_overrides(PARAMS, list(sets))["train"]["lr_by_backbone"]
    assert lrs("+train.lr_by_backbone.resnet18=0.001") == {"densenet121": 0.002, "resnet18": 0.001}
    assert lrs("~train.lr_by_backbone.densenet121") == {}
    assert lrs("++train.lr_by_backbone.densenet121=0.1") == {"densenet121": 0.1}  # add or override: a preset rerun
    assert lrs("++train.lr_by_backbone.resnet18=0.001") == {"densenet121": 0.002, "resnet18": 0.001}
    assert lrs("train.lr_by_backbone.densenet121=0.001") == {"densenet121": 0.001}
    assert lrs("train.lr_by_backbone={}") == {"densenet121": 0.002}  # merged, as DVC does: {} clears nothing
    for bad in ("train.lr_by_backbone.resnet18=0.001", "+train.lr_by_backbone.densenet121=0.1", "~train.lr",
                "+train.lrr=1", "~train.lr_by_backbone.resnet18"):
        with pytest.raises(PipelineError, match="a new entry of a map: \\+train.lr_by_backbone"):
            with_overrides(PARAMS, [bad])


def test_pretrained_names_the_models_that_start_from_imagenet(tmp_path):
    """train.pretrained as a list: those timm names start from ImageNet weights, every other model (the student) from
    scratch; each model's params (and fingerprint) hold only its own true or false."""
    from pipeline.lib.teachers import Teacher
    from pipeline.lib.training import for_backbone

    params = with_value("train.pretrained", ["tf_efficientnet_lite0"])
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(params))
    loaded = load_params(tmp_path / "p.yaml")
    assert for_backbone(loaded, "tf_efficientnet_lite0")["train"]["pretrained"] is True
    assert for_backbone(loaded, "resnet10t")["train"]["pretrained"] is False
    teacher = Teacher.from_params(loaded, "tf_efficientnet_lite0")
    assert teacher.model.pretrained and teacher.learned["train.pretrained"] is True
    assert not Teacher.from_params(loaded, "resnet10t").model.pretrained


def test_epochs_by_backbone_sets_one_teachers_epochs_and_fingerprint_only():
    from pipeline.lib import checkpoints
    from pipeline.lib.model_card import teacher_epochs
    from pipeline.lib.training import for_backbone, train_config

    params = with_value("train.epochs_by_backbone", {"densenet121": 4})
    dense, res = for_backbone(params, "densenet121"), for_backbone(params, "resnet10t")
    assert train_config(dense["train"], 0).epochs == 4
    assert train_config(res["train"], 0).epochs == params["train"]["epochs"]
    other = with_value("train.epochs_by_backbone", {"densenet121": 5})
    learned = lambda p, name: checkpoints.learned_params(for_backbone(p, name), checkpoints.TEACHER_PARAMS)
    assert learned(params, "resnet10t") == learned(other, "resnet10t")  # another teacher's epochs: not retrained
    assert learned(params, "densenet121")["train.epochs"] == 4 and learned(other, "densenet121")["train.epochs"] == 5
    assert learned(params, "resnet10t") == learned(with_value("train.epochs_by_backbone", {}), "resnet10t")
    assert teacher_epochs(params["train"]).endswith("4 (densenet121) epochs")
    assert teacher_epochs(other["train"] | {"epochs_by_backbone": {}}) == f"{params['train']['epochs']} epochs"


def test_a_misspelt_epochs_by_backbone_name_is_refused(tmp_path, monkeypatch, capsys):
    code, err = run_validate(with_value("train.epochs_by_backbone", {"densenet12": 3}), tmp_path, monkeypatch, capsys)
    assert code == 1 and "train.epochs_by_backbone" in err and "densenet12" in err, err
