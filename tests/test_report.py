"""The report stage: input checks, parameter injection, kernel and HTML export, and a checker for an executed run."""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pandas as pd
import pytest
import yaml

from pipeline.common import PipelineError

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "report.ipynb"
# Figures the report always draws; the grid of confident OOF mistakes (13th) is skipped when there are none.
REQUIRED_FIGURES = 12
PARAMETERS = {"prepared", "folds", "models", "ensemble", "student", "submissions", "params_file"}


def check_executed_report(project: Path) -> None:
    """After `dvc repro` in `project`: the executed report has no errors, its figures, and the leaderboard's scores."""
    executed, html = project / "notebooks" / "report.executed.ipynb", project / "notebooks" / "report.html"
    assert executed.is_file(), f"{executed} was not written"
    nb = nbformat.read(executed, as_version=4)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    errors = [f"{o.ename}: {o.evalue}" for o in outputs if o.output_type == "error"]
    assert not errors, f"error outputs in {executed}: {errors}"
    assert any("injected-parameters" in c.metadata.get("tags", []) for c in nb.cells), "no injected parameters"
    images = sum(o.output_type in ("display_data", "execute_result") and "image/png" in o.get("data", {})
                 for o in outputs)
    assert images >= REQUIRED_FIGURES, f"{executed} has {images} figures, expected at least {REQUIRED_FIGURES}"

    scores = [c for c in nb.cells if "scores" in c.metadata.get("tags", [])]
    assert len(scores) == 1, "expected one cell tagged `scores`"
    table = "".join(o.get("data", {}).get("text/html", "") for o in scores[0].outputs)
    rows = re.findall(r"<tr>(.*?)</tr>", table, re.S)
    board = pd.read_csv(project / "submissions" / "latest" / "leaderboard.csv")
    assert len(rows) == len(board), f"the scores table has {len(rows)} rows, the leaderboard {len(board)}"
    for row, (_, r) in zip(rows, board.iterrows()):  # same order: best first
        assert f"<td>{r['file']}</td>" in row, f"scores table row {row!r} is not {r['file']}"
        assert f"<td>{r['test_accuracy']:.4f}</td>" in row, f"{r['file']}: test accuracy differs from the leaderboard"
        assert f"<td>{r['test_roc_auc']:.4f}</td>" in row, f"{r['file']}: test AUC differs from the leaderboard"

    assert html.is_file(), f"{html} was not written"
    text = html.read_text(encoding="utf-8")
    assert text.count("data:image/png;base64") >= REQUIRED_FIGURES, "figures are not embedded in the HTML"
    assert board["file"].iat[0] in text


def source_cells(nb) -> str:
    return "\n".join(c.source for c in nb.cells if c.cell_type == "code")


def test_source_notebook_is_clean_and_parameterised():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in nb.cells if c.cell_type == "code")
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1
    names = {t.id for node in ast.parse(params[0].source).body for t in getattr(node, "targets", [])}
    assert names == PARAMETERS  # exactly what pipeline.report injects


def test_dvc_stage_lists_what_the_report_reads():
    """Every pipeline module the report imports, and every path it is given, is a dependency of the stage."""
    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["report"]
    code = source_cells(nbformat.read(NOTEBOOK, as_version=4)).replace("%matplotlib inline", "")
    code += (ROOT / "pipeline" / "report.py").read_text()
    modules = set(re.findall(r"^\s*from pipeline\.(\w+) import", code, re.M))
    assert {f"pipeline/{m}.py" for m in modules} | {"pipeline/report.py"} <= set(stage["deps"])
    args = dict(re.findall(r"--(\w+) (\S+)", stage["cmd"]))
    assert args.pop("notebook") in stage["deps"]
    assert {args.pop("executed"), args.pop("html")} == {next(iter(o)) for o in stage["outs"]}
    assert set(args) == PARAMETERS - {"params_file"} and set(args.values()) <= set(stage["deps"])


def run_report(tmp_path: Path, monkeypatch, notebook: Path = NOTEBOOK) -> None:
    from pipeline.report import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    monkeypatch.setattr(sys, "argv", [
        "report", "--notebook", str(notebook), "--executed", "out/report.executed.ipynb", "--html", "out/report.html",
        "--prepared", "data/prepared", "--folds", "data/folds.csv", "--models", "data/models",
        "--ensemble", "data/ensemble", "--student", "data/student", "--submissions", "submissions/latest"])
    main()


def test_missing_inputs_fail_before_executing(tmp_path, monkeypatch):
    with pytest.raises(PipelineError) as e:
        run_report(tmp_path, monkeypatch)
    msg = str(e.value)
    for missing in ("data/prepared/index.csv (stage `prepare`)", "data/folds.csv (stage `folds`)",
                    "data/models/resnet10t/fold0/live/metrics.json (stage `train@resnet10t`)",
                    "data/ensemble/oof.csv (stage `ensemble`)", "data/student/checkpoint.pt (stage `distill`)",
                    "submissions/latest/leaderboard.csv (stage `submit`)"):
        assert missing in msg
    assert not (tmp_path / "out").exists()


def test_missing_input_cli_exits_1_naming_it(tmp_path):
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    r = subprocess.run([sys.executable, "-m", "pipeline.report", "--notebook", str(NOTEBOOK), "--executed", "e.ipynb",
                        "--html", "e.html", "--prepared", "p", "--folds", "f.csv", "--models", "m", "--ensemble", "e",
                        "--student", "s", "--submissions", "sub"], cwd=tmp_path, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert r.returncode == 1
    assert "p/index.csv (stage `prepare`)" in r.stderr and "Traceback" not in r.stderr


def test_inject_parameters_replaces_an_earlier_injection():
    from pipeline.report import inject_parameters

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# t"),
                                         nbformat.v4.new_code_cell("a = 1", metadata={"tags": ["parameters"]}),
                                         nbformat.v4.new_code_cell("print(a)")])
    inject_parameters(nb, {"a": "x"})
    inject_parameters(nb, {"a": "data/y"})
    assert [c.metadata.get("tags", []) for c in nb.cells] == [[], ["parameters"], ["injected-parameters"], []]
    assert "a = 'data/y'" in nb.cells[2].source
    with pytest.raises(PipelineError, match="parameters"):
        inject_parameters(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("a = 1")]), {"a": 2})


def tiny_notebook(path: Path, body: str) -> Path:
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 0", metadata={"tags": ["parameters"]}),
                                         nbformat.v4.new_code_cell(body)])
    nbformat.write(nb, path)
    return path


def test_execute_runs_this_python_and_exports_html(tmp_path, monkeypatch):
    """A kernel on this interpreter even with no kernel spec installed (as in CI), and a bogus user one ignored."""
    from pipeline.report import execute

    bogus = tmp_path / "jupyter" / "kernels" / "python3"
    bogus.mkdir(parents=True)
    (bogus / "kernel.json").write_text('{"argv": ["/nonexistent/python", "{connection_file}"], '
                                       '"display_name": "bogus", "language": "python"}')
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.chdir(tmp_path)
    nb = tiny_notebook(tmp_path / "nb.ipynb", "%matplotlib inline\nimport sys, matplotlib.pyplot as plt\n"
                                              "plt.plot([0, x]); plt.title(sys.executable); plt.show()")
    execute(nb, tmp_path / "out.ipynb", tmp_path / "out.html", {"x": 3})
    done = nbformat.read(tmp_path / "out.ipynb", as_version=4)
    assert "x = 3" in done.cells[1].source
    assert any("image/png" in o.get("data", {}) for o in done.cells[2].outputs)
    assert "data:image/png;base64" in (tmp_path / "out.html").read_text()


def test_execute_names_the_failing_cell(tmp_path, monkeypatch):
    from pipeline.report import execute

    monkeypatch.chdir(tmp_path)
    nb = tiny_notebook(tmp_path / "nb.ipynb", "# read the student's scores\n"
                                              "open('data/student/scores.json')")
    with pytest.raises(PipelineError) as e:
        execute(nb, tmp_path / "out.ipynb", tmp_path / "out.html", {"x": 1})
    msg = str(e.value)
    assert "cell 2 (# read the student's scores)" in msg and "data/student/scores.json" in msg
    assert (tmp_path / "out.ipynb").is_file() and not (tmp_path / "out.html").exists()
