"""The report stage: input checks, parameter injection, kernel, HTML and PDF export, the model card, and a checker
for an executed run."""
from __future__ import annotations

import ast
import base64
import io
import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import nbformat
import pandas as pd
import pytest
import yaml
from PIL import Image

from pipeline.lib.common import PipelineError

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "report.ipynb"
# Figures the report always draws; the grid of confident OOF mistakes (13th) is skipped when there are none.
PARAMETERS = {"prepared", "folds", "models", "ensemble", "student", "submissions", "export", "params_file",
              "timings", "ablations"}
OUTPUTS = {"executed", "html", "pdf", "no-input-html", "card"}


def source_cells(nb) -> str:
    return "\n".join(c.source for c in nb.cells if c.cell_type == "code")


def test_source_notebook_is_clean_and_parameterised():
    with warnings.catch_warnings():  # e.g. a cell without an id: nbformat warns now and will refuse it later
        warnings.simplefilter("error")
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
    args = dict(re.findall(r"--([\w-]+) (\S+)", stage["cmd"]))
    assert args.pop("notebook") in stage["deps"]
    assert {args.pop(o) for o in OUTPUTS} == {next(iter(o)) for o in stage["outs"]}
    assert args.pop("timing-summary") in {next(iter(m)) for m in stage["metrics"]}
    assert args["timings"] in stage["deps"] and args["ablations"] in stage["deps"]
    assert set(args) == PARAMETERS - {"params_file"}
    from pipeline.report import required_inputs

    for n_folds in (1, 0):  # fold<k>/ folders, or full/ without folds
        needed = required_inputs(**{k: v for k, v in args.items() if k not in ("timings", "ablations")},
                                 backbones=["b"], n_folds=n_folds)
        for path in map(str, needed):  # the file itself, or a folder holding it
            assert any(path == d or path.startswith(d + "/") for d in stage["deps"]), f"{path} is not a dependency"


def test_required_inputs_without_folds_ask_for_the_all_cells_models():
    """folds.n 0: each backbone's full/ model and its training-loss curve; no fold folders, no validation curves."""
    from pipeline.report import required_inputs

    paths = dict(prepared="p", folds="f.csv", models="m", ensemble="e", student="s", submissions="sub", export="x")
    needed = {str(p): stage for p, stage in required_inputs(**paths, backbones=["b1", "b2"], n_folds=0).items()}
    for b in ("b1", "b2"):
        assert needed[f"m/{b}/full/live/metrics.json"] == f"train@{b}"
        assert needed[f"m/{b}/full/live/plots/metrics/train_loss.tsv"] == f"train@{b}"
    assert not [p for p in needed if "/fold" in p or "val_" in p]
    assert "e/oof.csv" in needed and "s/label_issues.csv" in needed  # written, empty or unchecked, in both modes
    with_folds = {str(p) for p in required_inputs(**paths, backbones=["b1"], n_folds=2)}
    assert "m/b1/fold1/live/plots/metrics/val_roc_auc.tsv" in with_folds
    assert "m/b1/full/live/metrics.json" not in with_folds


def run_report(tmp_path: Path, monkeypatch, notebook: Path = NOTEBOOK) -> None:
    from pipeline.report import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    monkeypatch.setattr(sys, "argv", [
        "report", "--notebook", str(notebook), "--executed", "out/report.executed.ipynb", "--html", "out/report.html",
        "--prepared", "data/prepared", "--folds", "data/folds.csv", "--models", "data/models",
        "--ensemble", "data/ensemble", "--student", "data/student", "--submissions", "submissions/latest",
        "--export", "data/export", "--pdf", "out/report.pdf", "--no-input-html", "out/report.no-input.html",
        "--card", "out/model_card.md"])
    main()


def test_missing_inputs_fail_before_executing(tmp_path, monkeypatch):
    with pytest.raises(PipelineError) as e:
        run_report(tmp_path, monkeypatch)
    msg = str(e.value)
    for missing in ("data/prepared/index.csv (stage `prepare`)", "data/folds.csv (stage `folds`)",
                    "data/models/resnet10t/fold0/live/metrics.json (stage `train@resnet10t`)",
                    "data/ensemble/oof.csv (stage `ensemble`)", "data/student/checkpoint.pt (stage `distill`)",
                    "data/student/label_issues.csv (stage `distill`)",
                    "submissions/latest/leaderboard.csv (stage `submit`)", "data/export/scores.json (stage `export`)",
                    "data/export/model.json (stage `export`)"):
        assert missing in msg
    assert not (tmp_path / "out").exists()


def test_missing_input_cli_exits_1_naming_it(tmp_path):
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    r = subprocess.run([sys.executable, "-m", "pipeline.report", "--notebook", str(NOTEBOOK), "--executed", "e.ipynb",
                        "--html", "e.html", "--prepared", "p", "--folds", "f.csv", "--models", "m", "--ensemble", "e",
                        "--student", "s", "--submissions", "sub", "--export", "x", "--pdf", "r.pdf",
                        "--no-input-html", "r.html", "--card", "card.md"], cwd=tmp_path, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert r.returncode == 1
    assert "p/index.csv (stage `prepare`)" in r.stderr and "x/model.json (stage `export`)" in r.stderr
    assert "Traceback" not in r.stderr


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


def executed_notebook(code: str):
    """An executed-looking notebook (outputs made here, no kernel): a heading, a code cell with a figure and a table."""
    buf = io.BytesIO()
    Image.new("RGB", (1400, 500), (180, 40, 60)).save(buf, "PNG")  # wider than the page: it must be scaled down
    table = pd.DataFrame({"file": ["student_tta.csv", "ensemble.csv"], "test_accuracy": [0.9437, 0.9296]})
    outputs = [nbformat.v4.new_output("display_data", data={"image/png": base64.b64encode(buf.getvalue()).decode(),
                                                            "text/plain": "<Figure>"}),
               nbformat.v4.new_output("display_data", data={"text/html": table.to_html(index=False),
                                                            "text/plain": "table"})]
    return nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# Run report\n\nScores of this run."),
                                           nbformat.v4.new_code_cell(code, execution_count=1, outputs=outputs)])


def test_pdf_hides_code_and_fetches_nothing(tmp_path, monkeypatch):
    """The no-input HTML and its PDF: figures and tables in, code out, and no network (the template links CDNs)."""
    import socket

    import pypdf

    from pipeline.report import to_html, write_pdf

    calls = []
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: calls.append(a) or [])
    monkeypatch.setattr(socket.socket, "connect", lambda self, *a: calls.append(a))
    html = to_html(executed_notebook("plotted_here = draw_the_figure()"), no_input=True)
    assert "plotted_here" not in html and 'jp-InputArea-editor"' not in html and "data:image/png;base64" in html
    assert "cdnjs.cloudflare.com" in html  # what a fetching renderer would try to load
    html = html.replace("</body>", '<img src="https://example.com/x.png"></body>')
    assert write_pdf(html, tmp_path / "r.pdf") >= 1
    assert not calls, f"WeasyPrint tried the network: {calls}"
    assert (tmp_path / "r.pdf").read_bytes().startswith(b"%PDF")
    text = "".join(page.extract_text() for page in pypdf.PdfReader(tmp_path / "r.pdf").pages)
    assert "Run report" in text and "0.9437" in text and "student_tta.csv" in text
    assert "plotted_here" not in text and "draw_the_figure" not in text


def fake_run(root: Path) -> dict:
    """The files the model card reads, as the pipeline's stages write them; returns model_card's path arguments."""
    names = [f"C{s}P{s}thinF_IMG_{i}.png" for s in (1, 2, 3) for i in range(4)]
    index = pd.DataFrame({"split": ["train"] * 8 + ["test"] * 4, "img_name": names, "label": [1, 0] * 6,
                          "group": [n.split("_IMG")[0] for n in names]})
    index = pd.concat([index, index.tail(2).assign(split="hidden", label=float("nan"))])
    (root / "prepared").mkdir(parents=True)
    index.to_csv(root / "prepared" / "index.csv", index=False)
    train = index[index["split"] == "train"].assign(fold=[0, 0, 0, 0, 1, 1, 1, 1])
    train[["img_name", "label", "group", "fold"]].to_csv(root / "folds.csv", index=False)
    (root / "ensemble").mkdir()
    # Three mistakes at threshold 0.4, two of them on slide C2P2thinF.
    train.assign(ensemble=0.5, ensemble_tta=[0.9, 0.1, 0.3, 0.2, 0.1, 0.45, 0.6, 0.2])[
        ["img_name", "label", "fold", "ensemble", "ensemble_tta"]].to_csv(root / "ensemble" / "oof.csv", index=False)
    (root / "ensemble" / "scores.json").write_text(json.dumps(
        {"blend": {"ensemble": {"threshold": 0.5}, "ensemble_tta": {"threshold": 0.4}}}))
    (root / "sub").mkdir()
    pd.DataFrame([("student_tta.csv", "student", True, 0.5, None, None, 0.94366, 0.981),
                  ("ensemble_tta.csv", "ensemble", True, 0.4, 0.916, 0.97, 0.9296, 0.975),
                  ("resnet10t.csv", "resnet10t", False, 0.5, 0.9, 0.96, 0.9, 0.95)],
                 columns=["file", "model", "tta", "threshold", "cv_accuracy", "cv_roc_auc", "test_accuracy",
                          "test_roc_auc"]).to_csv(root / "sub" / "leaderboard.csv", index=False)
    (root / "export").mkdir()
    timing = {"batch1_threads1": 1.9, "batch1_threads_all": 1.3, "batch64_threads1": 0.9, "batch64_threads_all": 0.5}
    fmt = {name: {"file": file, "size_mb": size, "accuracy": 0.944, "roc_auc": 0.981, "max_abs_dprob": dprob,
                  "ms_per_image": timing}
           for name, file, size, dprob in (("torch_fp32", "data/student/checkpoint.pt", 19.1, 0.0),
                                           ("onnx_fp32", "data/export/student.onnx", 19.0, 2e-7),
                                           ("onnx_int8", "data/export/student.int8.onnx", 4.9, 0.012))}
    (root / "export" / "scores.json").write_text(json.dumps({
        "student": "resnet10t", "img_size": 48, "threshold": 0.5, "threads_all": 2,
        "labelled": {"split": "test", "n_images": 4},
        "int8": {"kept": True, "gated": False, "tolerance_pp": 0.5, "min_images": 600,
                 "reason": "only 4 labelled images (< 600): reported, not gated"},
        "formats": fmt, "seconds": {"export": 2.0, "quantize": 3.0, "timing": 4.0}}))
    (root / "export" / "model.json").write_text(json.dumps({
        "format": "onnx", "models": {"student": {"file": "student.onnx"},
                                     "student-int8": {"file": "student.int8.onnx", "kept": True, "reason": "r"}},
        "arch": "resnet10t", "parameters": 4_920_000,
        "input": {"name": "image", "shape": ["batch", 3, 48, 48], "dtype": "float32", "channel_order": "RGB",
                  "layout": "NCHW", "resize": "bilinear to 48x48", "scale": "pixel / 255",
                  "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
        "output": {"name": "prob", "meaning": "probability of class 1 (parasitized)"}, "threshold": 0.5,
        "classes": {"0": "uninfected", "1": "parasitized"}, "tta": {"views": ["identity"], "crop_scale": 0.875},
        "params": {}, "git_commit": "abc1234"}))
    return {"prepared": str(root / "prepared"), "folds": str(root / "folds.csv"), "ensemble": str(root / "ensemble"),
            "submissions": str(root / "sub"), "export": str(root / "export")}


def test_model_card_from_the_run(tmp_path):
    from pipeline.lib.params import load_params
    from pipeline.lib.model_card import model_card

    paths, params = fake_run(tmp_path), load_params(ROOT / "params.yaml")
    card = model_card(**paths, params={**params, "data": {**params["data"], "source": "demo"}})
    assert "demo run on 12 labelled cells" in card  # said plainly, with the run's own count
    assert "`resnet10t`" in card and "abc1234" in card and "Chittagong" in card
    assert "4.92 M parameters" in card  # the manifest's count: the card needs neither timm nor torch
    assert "| train | 8 | 2 | 4 |" in card and "| hidden | 2 | 1 | – |" in card  # split, images, slides, parasitized
    assert "| student_tta.csv | – | – | 0.9437 | 0.9810 |" in card  # the best file's scores, no CV for the student
    assert "| onnx_int8 | 0.9440 | 0.9810 | 0.012 | 1.90 | 1.30 | 0.90 | 0.50 | 4.9 |" in card
    assert "The int8 model is kept: only 4 labelled images (< 600): reported, not gated." in card
    assert "3 of 8 out-of-fold predictions of `ensemble_tta` (threshold 0.400)" in card
    assert "| C2P2thinF | 2 | 4 | 50% |" in card.split("out-of-fold predictions")[-1]
    assert "not a diagnosis" in card and "python -m pipeline.predict cells/ --model student -o out.csv" in card
    assert "`--model student-int8` runs the int8 copy" in card
    local = model_card(**paths, params={**params, "data": {**params["data"], "source": "local", "path": "nih.zip"}})
    assert "demo" not in local.lower() and "`nih.zip`" in local


def no_fold_run(root: Path) -> dict:
    """fake_run as a run without folds (folds.n 0) writes it: fold -1, an empty oof.csv, no CV scores."""
    paths = fake_run(root)
    folds = pd.read_csv(root / "folds.csv").assign(fold=-1)
    folds.to_csv(root / "folds.csv", index=False)
    pd.read_csv(root / "ensemble" / "oof.csv").head(0).to_csv(root / "ensemble" / "oof.csv", index=False)
    # The test cells (slide C3P3thinF, labels 1, 0, 1, 0): two mistakes at 0.5.
    index = pd.read_csv(root / "prepared" / "index.csv")
    test = index[index["split"] == "test"][["img_name", "label"]].astype({"label": float})
    test.assign(ensemble=[0.6, 0.4, 0.8, 0.2], ensemble_tta=[0.2, 0.1, 0.9, 0.7]).to_csv(
        root / "ensemble" / "test.csv", index=False, float_format="%.6f")
    blend = {"method": "mean", "weights": {"resnet10t": 1.0}, "cv_log_loss": None, "threshold": 0.5,
             "threshold_cv_accuracy": None}
    (root / "ensemble" / "scores.json").write_text(json.dumps(
        {"cv": False, "blend": {"ensemble": blend, "ensemble_tta": blend}, "refit": {"on": False}}))
    board = pd.read_csv(root / "sub" / "leaderboard.csv").assign(cv_accuracy=float("nan"), cv_roc_auc=float("nan"))
    board.to_csv(root / "sub" / "leaderboard.csv", index=False)
    return paths


def test_model_card_without_folds_says_there_is_no_cv(tmp_path):
    from pipeline.lib.params import load_params
    from pipeline.lib.model_card import model_card

    params = load_params(ROOT / "params.yaml")
    params = {**params, "folds": {**params["folds"], "n": 0}, "train": {**params["train"], "epochs": 3}}
    card = model_card(**no_fold_run(tmp_path), params=params)
    assert ("No cross-validation (folds.n 0): each backbone trained once on all 8 training cells for 3 epochs, the "
            "last epoch kept; scores are on the labelled test set only.") in card
    assert "-fold cross-validation" not in card and "per fold" not in card
    assert "Labelled-test (no cross-validation) scores" in card and "CV accuracy" not in card
    assert "| student_tta.csv | 0.9437 | 0.9810 |" in card  # the test columns alone
    assert "2 of 4 labelled-test predictions of `ensemble_tta` (threshold 0.500)" in card
    assert "| C3P3thinF | 2 | 4 | 50% |" in card.split("labelled-test predictions")[-1]


def test_pdf_failures_name_the_file_and_the_fix(tmp_path, monkeypatch):
    import weasyprint

    from pipeline.report import write_pdf

    monkeypatch.setattr(weasyprint, "HTML", lambda **kw: (_ for _ in ()).throw(ValueError("bad box")))
    with pytest.raises(PipelineError, match=r"WeasyPrint failed to render .*r\.pdf .*ValueError: bad box"):
        write_pdf("<p>x</p>", tmp_path / "r.pdf")
    assert not (tmp_path / "r.pdf").exists()
    monkeypatch.setitem(sys.modules, "weasyprint", None)  # as if not installed
    with pytest.raises(PipelineError, match=r"Cannot write .*r\.pdf: WeasyPrint does not load .*pip install"):
        write_pdf("<p>x</p>", tmp_path / "r.pdf")
