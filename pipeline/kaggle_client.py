"""The Kaggle API client for the download and submit stages: credentials found without reading them, one clear error."""
from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

from pipeline.common import PipelineError

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
