"""Stage `download`: fetch the raw data (Kaggle, a local zip/folder, or a generated synthetic set) into one folder."""
from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import shutil
import zipfile
from pathlib import Path

from pipeline.common import PipelineError, load_params, run_main

log = logging.getLogger(__name__)

OFFLINE_HINT = (
    "To run without Kaggle, set in params.yaml `data.source: local` with `data.path` pointing at the "
    "downloaded competition zip (or a folder, or the public cell_images dataset), or `data.source: synthetic`."
)
CREDENTIALS_HELP = (
    "Kaggle credentials were not found. Create an API token on kaggle.com (Settings > API) and provide it "
    "in one of these ways: the environment variable KAGGLE_API_TOKEN; the file ~/.kaggle/access_token; "
    "the legacy file ~/.kaggle/kaggle.json (chmod 600); or the variables KAGGLE_USERNAME and KAGGLE_KEY. "
    "For a competition you must also accept its rules on its Kaggle page. " + OFFLINE_HINT
)


def kaggle_credentials_present() -> bool:
    """Whether any credential source the kaggle client reads exists (values are never read or logged)."""
    if os.environ.get("KAGGLE_API_TOKEN"):
        return True
    if os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY"):
        return True
    # The client reads access tokens (and OAuth credentials) from ~/.kaggle whatever KAGGLE_CONFIG_DIR says, and
    # kaggle.json from KAGGLE_CONFIG_DIR, else ~/.kaggle, else (on Linux, when ~/.kaggle is absent) the XDG folder.
    home = Path.home() / ".kaggle"
    config_dir = Path(os.environ.get("KAGGLE_CONFIG_DIR") or (
        home if home.exists() else Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "kaggle"))
    files = [home / "access_token", home / "access_token.txt", home / "credentials.json", config_dir / "kaggle.json"]
    return any(f.is_file() for f in files)


def kaggle_api():
    """An authenticated KaggleApi, or a PipelineError that says where credentials go."""
    if not kaggle_credentials_present():
        raise PipelineError(CREDENTIALS_HELP)
    # `import kaggle` authenticates at import time and prints to stdout; keep stdout clean for DVC logs.
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            from kaggle.api.kaggle_api_extended import KaggleApi

            api = KaggleApi()
            api.authenticate()
    except SystemExit as e:  # the client exits instead of raising when credentials are bad
        raise PipelineError(f"Kaggle authentication failed ({e}). {CREDENTIALS_HELP}") from None
    except ImportError as e:
        raise PipelineError(f"The kaggle package is not importable ({e}); run `pip install -r requirements.txt`.")
    except Exception as e:  # an access token is checked online, so network errors can surface here
        raise PipelineError(f"Kaggle authentication failed: {type(e).__name__}: {e}. Check the network. "
                            f"{OFFLINE_HINT}") from None
    return api


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
    for z in sorted(tmp.glob("*.zip")):
        extract_zip(z, out)
    shutil.rmtree(tmp)
    unpack_nested(out)


def extract_zip(zip_path: Path, dest: Path) -> None:
    """Extract one zip into dest, refusing members that would land outside it."""
    try:
        with zipfile.ZipFile(zip_path) as zf:
            for member in zf.infolist():
                target = (dest / member.filename).resolve()
                # Refuse zip-slip paths; skip macOS resource forks.
                if not target.is_relative_to(dest.resolve()):
                    raise PipelineError(f"{zip_path}: member {member.filename!r} escapes the archive folder.")
                if member.filename.startswith("__MACOSX/"):
                    continue
                zf.extract(member, dest)
    except zipfile.BadZipFile:
        raise PipelineError(f"{zip_path} is not a valid zip file; download it again.") from None


def unpack_nested(root: Path) -> None:
    """Extract zips found under root next to where they lie, until none is left (Kaggle nests train.zip)."""
    while inner := next(iter(sorted(root.rglob("*.zip"))), None):
        extract_zip(inner, inner.parent)
        inner.unlink()


def fetch_local(out: Path, path: str) -> None:
    if not path:
        raise PipelineError("data.source is `local` but data.path is empty: set it to the competition zip or folder.")
    src = Path(path).expanduser()
    if not src.exists():
        raise PipelineError(f"data.path {src} does not exist (relative paths are from the project root).")
    if src.is_dir():
        log.info("Copying %s", src)
        shutil.copytree(src, out, dirs_exist_ok=True)
    else:
        log.info("Extracting %s", src)
        extract_zip(src, out)
    unpack_nested(out)


def download(out: Path, *, source: str, path: str, competition: str, dataset: str, synthetic: dict,
             seed: int) -> None:
    if source not in ("kaggle", "local", "synthetic"):
        raise PipelineError(f"data.source is {source!r}; use one of: kaggle, local, synthetic.")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    if source == "kaggle":
        download_kaggle(out, competition, dataset)
    elif source == "local":
        fetch_local(out, path)
    else:
        from pipeline.synthetic import make_synthetic

        make_synthetic(out, n_train=synthetic["n_train"], n_test=synthetic["n_test"],
                       n_hidden=synthetic["n_hidden"], seed=seed)
    n = sum(1 for p in out.rglob("*") if p.is_file())
    log.info("Raw data in %s: %d files", out, n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, help="folder to fill (dvc.yaml names it)")
    args = parser.parse_args()
    d = load_params()["data"]
    download(Path(args.out), source=d["source"], path=d.get("path") or "", competition=d.get("competition") or "",
             dataset=d.get("dataset") or "", synthetic=d["synthetic"], seed=d["seed"])


if __name__ == "__main__":
    run_main(main)
