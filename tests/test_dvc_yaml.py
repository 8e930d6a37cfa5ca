"""dvc.yaml lists, for each stage, every pipeline module its command imports (directly or through other modules)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from helpers import direct_imports, module_file

ROOT = Path(__file__).resolve().parents[1]
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def imports(module: str, seen: set[str] | None = None, text: str | None = None) -> set[str]:
    """The pipeline modules (dotted names) `module` imports (or the code in `text`), transitively (lazy imports inside
    functions count too)."""
    seen = seen if seen is not None else set()
    found = set(direct_imports(module_file(module).read_text() if text is None else text))
    for m in found - seen:
        seen.add(m)
        imports(m, seen)
    return seen


def module_path(module: str) -> str:
    """pipeline.lib.engine -> pipeline/lib/engine.py, as dvc.yaml names it."""
    return module.replace(".", "/") + ".py"


def stage_module(name: str) -> str:
    return re.search(r"python -m (pipeline\.[\w.]+)", STAGES[name]["cmd"]).group(1)


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_deps_list_every_module_it_imports(name):
    stage = STAGES[name]
    module = stage_module(name)
    needed = {module_path(m) for m in imports(module) | {module}}
    missing = needed - set(stage["deps"])
    assert not missing, f"stage {name}: add {sorted(missing)} to its deps"
    if name != "validate":
        assert "data/validated.txt" in stage["deps"], f"stage {name} must depend on the validate stage's marker"


@pytest.mark.parametrize("name", ["train", "distill"])
def test_the_code_a_fingerprint_hashes_is_in_the_training_stages_deps(name):
    """checkpoints.TRAINING_CODE, the modules a model's fingerprint hashes (the decoder, images.py, among them: it
    makes the pixels), lies within the stage's deps: an edit there re-runs the stage (DVC), which retrains."""
    from pipeline.lib.checkpoints import TRAINING_CODE

    missing = {f"pipeline/lib/{m}" for m in TRAINING_CODE} - set(STAGES[name]["deps"])
    assert not missing, f"stage {name}: add {sorted(missing)} to its deps"


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_deps_list_no_module_it_does_not_import(name):
    """A module a stage does not import is not in its deps (an edit there would re-run the stage for nothing); the
    report's notebook imports count as the report's, and the code a fingerprint hashes as the training stages'."""
    from pipeline.lib.checkpoints import TRAINING_CODE

    module = stage_module(name)
    used = imports(module) | {module}
    if name == "report":
        cells = json.loads((ROOT / "notebooks" / "report.ipynb").read_text())["cells"]
        used |= imports("report.ipynb", text="\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code"))
    allowed = {module_path(m) for m in used}
    if name in ("train", "distill"):
        allowed |= {f"pipeline/lib/{m}" for m in TRAINING_CODE}
    extra = {d for d in STAGES[name]["deps"] if d.startswith("pipeline/")} - allowed
    assert not extra, f"stage {name}: {sorted(extra)} in its deps, not imported"
