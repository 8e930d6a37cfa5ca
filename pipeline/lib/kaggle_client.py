"""The Kaggle API client for the download and submit stages: credentials found without reading them (in a Kaggle
notebook, from its Secrets), one clear error."""
from __future__ import annotations

import contextlib
import importlib.util
import io
import os
from pathlib import Path

from pipeline.lib.common import PipelineError

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
# Inside a Kaggle notebook the token is not in the environment: it is a Secret the notebook reads.
SECRETS = (("KAGGLE_API_TOKEN",), ("KAGGLE_USERNAME", "KAGGLE_KEY"))
SECRETS_HELP = (
    "Kaggle credentials were not found in this Kaggle notebook's Secrets. In the notebook's editor open Add-ons → "
    "Secrets, add a secret named KAGGLE_API_TOKEN holding your API token (kaggle.com → Settings → API → Generate New "
    "Token), or two secrets KAGGLE_USERNAME and KAGGLE_KEY (from a legacy kaggle.json), tick it for this notebook, "
    "and run again. For a competition you must also accept its rules on its Kaggle page."
)


def in_kaggle_notebook() -> bool:
    """Whether this runs inside a Kaggle notebook (its image ships the kaggle_secrets module)."""
    return importlib.util.find_spec("kaggle_secrets") is not None


def credentials_from_kaggle_secrets() -> tuple[str, ...]:
    """Inside a Kaggle notebook: put the token of its attached Secrets into this process's environment (where the
    kaggle client and the processes started from here read it); the secrets' names, or () when none is attached.
    Values are never logged."""
    if not in_kaggle_notebook():
        return ()
    from kaggle_secrets import UserSecretsClient

    client = UserSecretsClient()
    for names in SECRETS:
        try:
            values = [client.get_secret(n) for n in names]
        except Exception:  # a secret that is not attached raises (the client's own error types vary by image)
            continue
        if all(values):
            os.environ.update(zip(names, values))
            return names
    return ()


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
    if not kaggle_credentials_present() and not credentials_from_kaggle_secrets():
        raise PipelineError(SECRETS_HELP if in_kaggle_notebook() else CREDENTIALS_HELP)
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
