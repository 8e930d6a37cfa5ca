"""Stage `download`: fetch the raw data (Kaggle, a local zip/folder, or a generated synthetic set) into one folder."""
from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path

from pipeline.lib.archives import Budget, copy_folder, extract_zip, unpack_nested
from pipeline.lib.common import PipelineError, path_overlap, run_main, written_whole
from pipeline.lib.kaggle_client import OFFLINE_HINT, kaggle_api
from pipeline.lib.params import load_params

log = logging.getLogger(__name__)

def download_kaggle(out: Path, competition: str, dataset: str) -> None:
    api = kaggle_api()
    tmp = out / "_download"
    tmp.mkdir(parents=True, exist_ok=True)
    what = f"dataset {dataset}" if dataset else f"competition {competition}"
    log.info("Downloading Kaggle %s", what)
    try:
        if dataset:
            api.dataset_download_files(dataset, path=str(tmp), unzip=False, quiet=False)
        else:
            api.competition_download_files(competition, path=str(tmp), quiet=False)
    except Exception as e:  # network errors, 403 (rules not accepted), 404 (wrong slug)
        raise PipelineError(
            f"Downloading Kaggle {what} failed: {type(e).__name__}: {e}. Check the network, the slug in "
            f"params.yaml, and that you accepted the competition's rules. {OFFLINE_HINT}") from None
    budget = Budget(out)
    for z in sorted(tmp.glob("*.zip")):
        extract_zip(z, out, budget)
    shutil.rmtree(tmp)
    unpack_nested(out, budget)


def fetch_local(out: Path, path: str) -> None:
    if not path:
        raise PipelineError("data.source is `local` but data.path is empty: set it to the competition zip or folder.")
    src = Path(path).expanduser()
    if not src.exists():
        raise PipelineError(f"data.path {src} does not exist (relative paths are from the project root).")
    budget = Budget(out)
    if src.is_dir():
        log.info("Copying %s", src)
        copy_folder(src, out, budget)
    else:
        log.info("Extracting %s", src)
        extract_zip(src, out, budget)
    unpack_nested(out, budget)


def download(out: Path, *, source: str, path: str, competition: str, dataset: str, synthetic: dict,
             seed: int, demo: Path | None = None) -> None:
    if source not in ("demo", "kaggle", "local", "synthetic"):
        raise PipelineError(f"data.source is {source!r}; use one of: demo, kaggle, local, synthetic.")
    if source == "local" and path and (relation := path_overlap(Path(path).expanduser(), out)):
        # The folder is replaced whole: a data.path in it would be deleted, one above it copied into itself.
        raise PipelineError(f"data.path {path} is {relation} {out}, this stage's output, which it replaces: move the "
                            "data outside it and set data.path there.")
    out.parent.mkdir(parents=True, exist_ok=True)
    # Unpacked beside `out` and renamed when complete: a kill mid-unpack never leaves a half data/raw.
    with written_whole(out) as tmp:
        tmp.mkdir()
        if source == "kaggle":
            download_kaggle(tmp, competition, dataset)
        elif source == "local":
            fetch_local(tmp, path)
        elif source == "demo":
            if demo is None or not demo.is_file():
                raise PipelineError(f"The demo bundle {demo} is missing; it is in git (rebuild it with "
                                    "`python -m pipeline.tools.demo_bundle`).")
            fetch_local(tmp, str(demo))
        else:
            from pipeline.lib.synthetic import make_synthetic

            make_synthetic(tmp, n_train=synthetic["n_train"], n_test=synthetic["n_test"],
                           n_hidden=synthetic["n_hidden"], seed=seed)
    n = sum(1 for p in out.rglob("*") if p.is_file())
    log.info("Raw data in %s: %d files", out, n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, help="folder to fill (dvc.yaml names it)")
    parser.add_argument("--demo", type=Path, help="the demo bundle (data.source: demo)")
    args = parser.parse_args()
    d = load_params()["data"]
    download(Path(args.out), source=d["source"], path=d.get("path") or "", competition=d.get("competition") or "",
             dataset=d.get("dataset") or "", synthetic=d["synthetic"], seed=d["seed"], demo=args.demo)


if __name__ == "__main__":
    run_main(main)
