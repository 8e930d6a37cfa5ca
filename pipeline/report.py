"""Stage `report`: check the run's outputs, run notebooks/report.ipynb (nbclient); write HTML, PDF, model card."""
from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from pathlib import Path

from pipeline.lib.common import PipelineError, run_main, write_text_whole, written_whole
from pipeline.lib.layout import model_folders
from pipeline.lib.model_card import model_card
from pipeline.lib.params import load_params

log = logging.getLogger(__name__)

LIVE_METRICS = ("train_loss", "val_log_loss", "val_roc_auc", "val_accuracy")  # the learning curves drawn
# Print rules (WeasyPrint's media, and a browser's print): A4, figures fit the page, no figure or table cut in two.
PRINT_CSS = """<style>@media print {
  @page { size: A4; margin: 14mm 12mm 16mm;
          @bottom-right { content: counter(page) " / " counter(pages); font-size: 8pt; color: #777; } }
  body { font-size: 10pt; }
  img { max-width: 100% !important; height: auto !important; }
  img, svg, table, pre, .jp-OutputArea-child, .jp-RenderedImage { break-inside: avoid; }
  h1, h2, h3, h4, .jp-MarkdownCell { break-after: avoid; }  /* a heading or text stays with what follows */
  .jp-RenderedHTMLCommon table { table-layout: auto !important; font-size: 7.5pt !important; max-width: 100%; }
  .jp-RenderedHTMLCommon td, .jp-RenderedHTMLCommon th { padding: 0.25em 0.45em !important; }
  .highlight pre { font-family: monospace; font-size: 8.5pt; background: #f5f5f5; padding: 0.6em; }
}</style>"""


def live_metrics(n_folds: int) -> tuple[str, ...]:
    """The learning curves drawn: training and validation, or the training loss alone (folds.n 0: nothing held out)."""
    return LIVE_METRICS if n_folds else LIVE_METRICS[:1]


def required_inputs(*, prepared: str, folds: str, models: str, ensemble: str, student: str, submissions: str,
                    export: str, backbones: list[str], n_folds: int) -> dict[Path, str]:
    """Every file the notebook reads, with the DVC stage that writes it."""
    need = {Path(prepared, "index.csv"): "prepare", Path(prepared, "images.npy"): "prepare", Path(folds): "folds"}
    for b in backbones:
        for folder in model_folders(n_folds):
            live = Path(models, b, folder, "live")
            for name in ("metrics.json", *(f"plots/metrics/{m}.tsv" for m in live_metrics(n_folds))):
                need[live / name] = f"train@{b}"
    for name in ("oof.csv", "test.csv", "scores.json"):
        need[Path(ensemble, name)] = "ensemble"
    for name in ("test.csv", "scores.json", "label_issues.csv", "checkpoint.pt", "live/plots/metrics/train_loss.tsv"):
        need[Path(student, name)] = "distill"
    need[Path(submissions, "leaderboard.csv")] = "submit"
    for name in ("scores.json", "model.json"):
        need[Path(export, name)] = "export"
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


def execute(notebook: Path, executed: Path, html: Path, parameters: dict, timeout: int = 1200):
    """Run every cell in a fresh kernel in the working directory; write (and return) the executed notebook and HTML."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

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
    with written_whole(executed) as tmp:
        nbformat.write(nb, tmp)
    body = to_html(nb)
    write_text(html, body)
    n_images = sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))
    log.info("Wrote %s (%d figures) and %s (%.1f MB)", executed, n_images, html, len(body) / 1e6)
    return nb


def to_html(nb, *, no_input: bool = False) -> str:
    """One self-contained HTML page (figures embedded, print CSS); no_input hides code cells and their prompts."""
    from nbconvert import HTMLExporter

    hide = dict(exclude_input=True, exclude_input_prompt=True, exclude_output_prompt=True) if no_input else {}
    exporter = HTMLExporter(embed_images=True, **hide)
    exporter.log.setLevel(logging.ERROR)  # not a warning per figure that outputs have no alt text
    body, _ = exporter.from_notebook_node(nb, resources={"metadata": {"name": "report"}})
    # A zero-width space after each `_` of a table header: a wide table's headers (test_roc_auc) wrap to fit a page.
    body = re.sub(r"<th([^>]*)>([^<]*)</th>", lambda m: f"<th{m[1]}>{m[2].replace('_', '_&#8203;')}</th>", body)
    return body.replace("</head>", PRINT_CSS + "\n</head>", 1)


def write_text(path: Path, text: str) -> None:
    """Write UTF-8 text, whole or not at all, making the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_whole(path, text)


def write_pdf(html: str, pdf: Path) -> int:
    """Render HTML to a PDF with WeasyPrint, offline (only data: and file: URLs are read); returns the page count."""
    # WeasyPrint warns once per browser-only rule of the notebook theme's CSS (~200); failed loads are errors.
    logging.getLogger("weasyprint").setLevel(logging.ERROR)
    logging.getLogger("fontTools").setLevel(logging.WARNING)  # font subsetting logs every table at INFO
    try:
        import weasyprint
    except (ImportError, OSError) as e:  # OSError: WeasyPrint is installed but Pango is not
        raise PipelineError(f"Cannot write {pdf}: WeasyPrint does not load ({e}). Install it with `pip install -r "
                            "requirements.txt`; it also needs the Pango library (Debian/Ubuntu: `apt install "
                            "libpango-1.0-0 libpangoft2-1.0-0`, macOS: `brew install pango`).") from None
    start = time.perf_counter()
    try:
        # The template's <script> tags (require.js, MathJax on a CDN) are never fetched: WeasyPrint runs no scripts.
        doc = weasyprint.HTML(string=html, url_fetcher=weasyprint.URLFetcher(allowed_protocols={"data", "file"}))
        document = doc.render()
        pdf.parent.mkdir(parents=True, exist_ok=True)
        with written_whole(pdf) as tmp:
            document.write_pdf(tmp)
    except PipelineError:  # a full disk: written_whole's message, and the last complete PDF kept
        raise
    except Exception as e:  # a third-party renderer: any failure is reported with the file it was writing
        pdf.unlink(missing_ok=True)
        raise PipelineError(f"WeasyPrint failed to render {pdf} from the report's HTML ({type(e).__name__}: {e}). "
                            "The executed notebook and the HTML copies are written; check WeasyPrint and Pango "
                            "with `python -m weasyprint --info`.") from e
    log.info("Wrote %s (%d pages, %.1f MB) in %.1f s", pdf, len(document.pages), pdf.stat().st_size / 1e6,
             time.perf_counter() - start)
    return len(document.pages)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--notebook", required=True, type=Path, help="the report notebook (source, no outputs)")
    parser.add_argument("--executed", required=True, type=Path, help="the executed notebook to write")
    parser.add_argument("--html", required=True, type=Path, help="the HTML copy to write")
    parser.add_argument("--prepared", required=True, help="the prepare stage's folder")
    parser.add_argument("--folds", required=True, help="the folds CSV")
    parser.add_argument("--models", required=True, help="the train stages' <backbone>/fold<k>/ (or full/) folders")
    parser.add_argument("--ensemble", required=True, help="the ensemble stage's folder")
    parser.add_argument("--student", required=True, help="the distill stage's folder")
    parser.add_argument("--submissions", required=True, help="the submit stage's folder (leaderboard.csv)")
    parser.add_argument("--export", required=True, help="the export stage's folder (scores.json, model.json)")
    parser.add_argument("--pdf", required=True, type=Path, help="the PDF to write (code hidden)")
    parser.add_argument("--no-input-html", required=True, type=Path, help="the HTML copy with code hidden to write")
    parser.add_argument("--card", required=True, type=Path, help="the model card (markdown) to write")
    parser.add_argument("--params", default="params.yaml", help="the params file the run used")
    parser.add_argument("--timings", type=Path, help="the folder of every other stage's wall time (<stage>.json)")
    parser.add_argument("--ablations", type=Path, help="the measured switches (python -m pipeline.tools.bench ablate), a CSV")
    parser.add_argument("--timing-summary", type=Path, help="the minutes per stage and in all to write (a DVC metric)")
    args = parser.parse_args()
    start = time.perf_counter()
    for f in (args.notebook, Path(args.params)):
        if not f.is_file():
            raise PipelineError(f"{f} is missing.")
    params = load_params(args.params)
    paths = dict(prepared=args.prepared, folds=args.folds, models=args.models, ensemble=args.ensemble,
                 student=args.student, submissions=args.submissions, export=args.export)
    check_inputs(required_inputs(**paths, backbones=params["train"]["backbones"],
                                 n_folds=params["folds"]["n"]))
    for f in (args.no_input_html, args.pdf, args.card):
        f.unlink(missing_ok=True)  # no stale copy of an older run beside this one's notebook
    nb = execute(args.notebook, args.executed, args.html,
                 {**paths, "params_file": args.params, "timings": str(args.timings or ""),
                  "ablations": str(args.ablations or "")})
    html = to_html(nb, no_input=True)
    write_text(args.no_input_html, html)
    write_pdf(html, args.pdf)
    write_text(args.card, model_card(prepared=args.prepared, folds=args.folds, ensemble=args.ensemble,
                                     submissions=args.submissions, export=args.export, params=params))
    log.info("Wrote %s and %s", args.no_input_html, args.card)
    if args.timing_summary:
        write_timing_summary(args.timings, args.timing_summary, time.perf_counter() - start)


def write_timing_summary(folder: Path | None, out: Path, report_seconds: float) -> dict:
    """Minutes per stage (the files run_main wrote, and this report) and their sum: the run's cost at a glance."""
    minutes = {f.stem: json.loads(f.read_text())["minutes"] for f in sorted(folder.glob("*.json"))} if folder else {}
    minutes["report"] = round(report_seconds / 60, 3)
    summary = {"minutes": minutes, "total_minutes": round(sum(minutes.values()), 2)}
    write_text(out, json.dumps(summary, indent=2))
    log.info("Minutes per stage: %s; in all %.2f", ", ".join(f"{k} {v:.2f}" for k, v in minutes.items()),
             summary["total_minutes"])
    return summary


if __name__ == "__main__":
    run_main(main)
