"""dvc.yaml lists, for each stage, every pipeline module its command imports (directly or through other modules)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def imports(module: str, seen: set[str] | None = None, text: str | None = None) -> set[str]:
    """pipeline modules `module` imports (or the code in `text`), transitively (lazy imports inside functions count
    too)."""
    seen = seen if seen is not None else set()
    text = text if text is not None else (ROOT / "pipeline" / f"{module}.py").read_text()
    found = set(re.findall(r"^\s*from pipeline\.(\w+) import", text, re.M))
    found |= {m for group in re.findall(r"^\s*from pipeline import ([\w, ]+)", text, re.M)
              for m in re.findall(r"(\w+)(?: as \w+)?", group) if m != "as"}
    for m in found - seen:
        seen.add(m)
        imports(m, seen)
    return seen


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_deps_list_every_module_it_imports(name):
    stage = STAGES[name]
    module = re.search(r"python -m pipeline\.(\w+)", stage["cmd"]).group(1)
    needed = {f"pipeline/{m}.py" for m in imports(module) | {module}}
    missing = needed - set(stage["deps"])
    assert not missing, f"stage {name}: add {sorted(missing)} to its deps"
    if name != "validate":
        assert "data/validated.txt" in stage["deps"], f"stage {name} must depend on the validate stage's marker"


@pytest.mark.parametrize("name", ["train", "distill"])
def test_the_code_a_fingerprint_hashes_is_in_the_training_stages_deps(name):
    """checkpoints.TRAINING_CODE, the modules a model's fingerprint hashes (the decoder, images.py, among them: it
    makes the pixels), lies within the stage's deps: an edit there re-runs the stage (DVC), which retrains."""
    from pipeline.checkpoints import TRAINING_CODE

    missing = {f"pipeline/{m}" for m in TRAINING_CODE} - set(STAGES[name]["deps"])
    assert not missing, f"stage {name}: add {sorted(missing)} to its deps"


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_deps_list_no_module_it_does_not_import(name):
    """A module a stage does not import is not in its deps (an edit there would re-run the stage for nothing); the
    report's notebook imports count as the report's, and the code a fingerprint hashes as the training stages'."""
    from pipeline.checkpoints import TRAINING_CODE

    module = re.search(r"python -m pipeline\.(\w+)", STAGES[name]["cmd"]).group(1)
    used = imports(module) | {module}
    if name == "report":
        cells = json.loads((ROOT / "notebooks" / "report.ipynb").read_text())["cells"]
        used |= imports("report.ipynb", text="\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code"))
    allowed = {f"pipeline/{m}.py" for m in used}
    if name in ("train", "distill"):
        allowed |= {f"pipeline/{m}" for m in TRAINING_CODE}
    extra = {d for d in STAGES[name]["deps"] if d.startswith("pipeline/")} - allowed
    assert not extra, f"stage {name}: {sorted(extra)} in its deps, not imported"
