"""The house: the stages (pipeline/*.py, one module each, and the predict command), the library they share
(pipeline/lib/) and the tools (pipeline/tools/); imports go stage -> library and tool -> library (or tool) only."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import yaml

from helpers import direct_imports

ROOT = Path(__file__).resolve().parents[1]
STAGE_COMMANDS = {re.search(r"python -m (pipeline\.\w+)", s["cmd"]).group(1)
                  for s in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].values()}
STAGES = sorted(f"pipeline.{p.stem}" for p in (ROOT / "pipeline").glob("*.py") if p.stem != "__init__")
LIBRARY = sorted(f"pipeline.lib.{p.stem}" for p in (ROOT / "pipeline" / "lib").glob("*.py") if p.stem != "__init__")
TOOLS = sorted(f"pipeline.tools.{p.stem}" for p in (ROOT / "pipeline" / "tools").glob("*.py") if p.stem != "__init__")


def source(module: str) -> str:
    return (ROOT / (module.replace(".", "/") + ".py")).read_text()


def test_the_top_folder_holds_the_stages_and_the_predict_command_only():
    assert set(STAGES) == STAGE_COMMANDS | {"pipeline.predict"}, "a module in pipeline/ that no stage runs: move it to " \
                                                                  "pipeline/lib/ (shared code) or pipeline/tools/"


@pytest.mark.parametrize("module", STAGES + LIBRARY + TOOLS)
def test_imports_go_from_stages_and_tools_to_the_library(module):
    imported = set(direct_imports(source(module)))
    if module in STAGES:
        assert not imported & set(STAGES), f"{module} imports a stage: move what it shares to pipeline/lib/"
    assert all(m.startswith(("pipeline.lib.", "pipeline.tools.")) for m in imported), \
        f"{module} imports {sorted(m for m in imported if m.count('.') == 1)}: by their pipeline.lib/tools names"
    if module not in TOOLS:
        assert not any(m in TOOLS for m in imported), f"{module} imports a tool"


def test_the_tools_earlier_command_names_still_answer():
    """`python -m pipeline.bench` (the README of earlier versions) runs pipeline/tools/bench.py."""
    for tool in TOOLS:
        spec = importlib.util.find_spec(f"pipeline.{tool.rsplit('.', 1)[1]}")
        assert spec and Path(spec.origin) == ROOT / "pipeline" / "tools" / f"{tool.rsplit('.', 1)[1]}.py"
