"""Stage `report`: check the run's outputs, execute notebooks/report.ipynb on them with nbclient, export HTML."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pipeline.common import PipelineError, run_main
from pipeline.params import load_params

log = logging.getLogger(__name__)

LIVE_METRICS = ("train_loss", "val_log_loss", "val_roc_auc", "val_accuracy")  # the learning curves drawn


def required_inputs(*, prepared: str, folds: str, models: str, ensemble: str, student: str, submissions: str,
                    backbones: list[str], n_folds: int) -> dict[Path, str]:
    """Every file the notebook reads, with the DVC stage that writes it."""
    need = {Path(prepared, "index.csv"): "prepare", Path(prepared, "images.npy"): "prepare", Path(folds): "folds"}
    for b in backbones:
        for k in range(n_folds):
            live = Path(models, b, f"fold{k}", "live")
            for name in ("metrics.json", *(f"plots/metrics/{m}.tsv" for m in LIVE_METRICS)):
                need[live / name] = f"train@{b}"
    for name in ("oof.csv", "test.csv", "scores.json"):
        need[Path(ensemble, name)] = "ensemble"
    for name in ("test.csv", "scores.json", "checkpoint.pt", "live/plots/metrics/train_loss.tsv"):
        need[Path(student, name)] = "distill"
    need[Path(submissions, "leaderboard.csv")] = "submit"
    return need


def check_inputs(need: dict[Path, str]) -> None:
    """Fail naming every missing output and the stage to run, before anything is executed."""
    missing = [f"{path} (stage `{stage}`)" for path, stage in need.items() if not path.is_file()]
    if missing:
        raise PipelineError(f"The report needs outputs that do not exist; run `dvc repro` (or the stages named) "
                            f"first. Missing: {', '.join(missing)}.")


def inject_parameters(nb, parameters: dict) -> None:
    """Papermill-style: a cell tagged `injected-parameters` right after the cell tagged `parameters`."""
    tags = [c.metadata.get("tags", []) for c in nb.cells]
    at = next((i for i, t in enumerate(tags) if "parameters" in t), None)
    if at is None:
        raise PipelineError("The report notebook has no cell tagged `parameters`.")
    import nbformat

    source = "# Injected by pipeline.report\n" + "".join(f"{k} = {v!r}\n" for k, v in parameters.items())
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    nb.cells = [c for i, c in enumerate(nb.cells) if "injected-parameters" not in tags[i]]
    nb.cells.insert(at + 1, cell)


def kernel_manager_class():
    """Kernels on this very interpreter: CI installs no kernel spec, and a user's `python3` spec may be another env."""
    from jupyter_client import AsyncKernelManager
    from jupyter_client.kernelspec import KernelSpec, KernelSpecManager

    class ThisPython(KernelSpecManager):
        def get_kernel_spec(self, kernel_name, *args, **kwargs):
            return KernelSpec(argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                              display_name="Python 3 (pipeline)", language="python")

    class ThisPythonKernel(AsyncKernelManager):
        def __init__(self, **kwargs):
            super().__init__(kernel_spec_manager=ThisPython(), **kwargs)

    return ThisPythonKernel  # a class, not an instance: nbclient then owns the kernel and shuts it down


def first_error(nb) -> str:
    """`cell N (first line): Error: message` for the first cell with an error output."""
    for i, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                first = next((s for s in cell.source.splitlines() if s.strip()), "")
                return f"cell {i} ({first[:80]}): {out.ename}: {out.evalue}"
    return "no cell has an error output"


def execute(notebook: Path, executed: Path, html: Path, parameters: dict, timeout: int = 1200) -> None:
    """Run every cell in a fresh kernel in the working directory; write the executed notebook and its HTML."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError
    from nbconvert import HTMLExporter

    nb = nbformat.read(notebook, as_version=4)
    inject_parameters(nb, parameters)
    client = NotebookClient(nb, kernel_manager_class=kernel_manager_class(), kernel_name="python3", timeout=timeout,
                            resources={"metadata": {"path": str(Path.cwd())}})
    executed.parent.mkdir(parents=True, exist_ok=True)
    try:
        client.execute()
    except (CellExecutionError, CellTimeoutError, DeadKernelError) as e:
        nbformat.write(nb, executed)  # kept for reading the traceback; the stage fails, so DVC records nothing
        html.unlink(missing_ok=True)  # no stale copy of an older run beside it
        where = first_error(nb) if isinstance(e, CellExecutionError) else f"{type(e).__name__}: {e}"
        raise PipelineError(f"{notebook} failed in {where.rstrip('.')}. The partly executed notebook is "
                            f"{executed}.") from None
    if (where := first_error(nb)) != "no cell has an error output":
        raise PipelineError(f"{notebook}: {where}.")
    nbformat.write(nb, executed)
    exporter = HTMLExporter(embed_images=True)
    exporter.log.setLevel(logging.ERROR)  # not a warning per figure that outputs have no alt text
    body, _ = exporter.from_notebook_node(nb, resources={"metadata": {"name": "report"}})
    html.parent.mkdir(parents=True, exist_ok=True)
    html.write_text(body, encoding="utf-8")
    n_images = sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))
    log.info("Wrote %s (%d figures) and %s (%.1f MB)", executed, n_images, html, len(body) / 1e6)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--notebook", required=True, type=Path, help="the report notebook (source, no outputs)")
    parser.add_argument("--executed", required=True, type=Path, help="the executed notebook to write")
    parser.add_argument("--html", required=True, type=Path, help="the HTML copy to write")
    parser.add_argument("--prepared", required=True, help="the prepare stage's folder")
    parser.add_argument("--folds", required=True, help="the folds CSV")
    parser.add_argument("--models", required=True, help="the train stages' <backbone>/fold<k>/ folders")
    parser.add_argument("--ensemble", required=True, help="the ensemble stage's folder")
    parser.add_argument("--student", required=True, help="the distill stage's folder")
    parser.add_argument("--submissions", required=True, help="the submit stage's folder (leaderboard.csv)")
    parser.add_argument("--params", default="params.yaml", help="the params file the run used")
    args = parser.parse_args()
    for f in (args.notebook, Path(args.params)):
        if not f.is_file():
            raise PipelineError(f"{f} is missing.")
    params = load_params(args.params)
    paths = dict(prepared=args.prepared, folds=args.folds, models=args.models, ensemble=args.ensemble,
                 student=args.student, submissions=args.submissions)
    check_inputs(required_inputs(**paths, backbones=params["train"]["backbones"],
                                 n_folds=params["folds"]["n"]))
    execute(args.notebook, args.executed, args.html, {**paths, "params_file": args.params})


if __name__ == "__main__":
    run_main(main)
