"""source=kaggle without credentials or network: fast, clear PipelineErrors that never leak a secret."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from pipeline.lib.common import PipelineError
from pipeline.download import download
from pipeline.lib.kaggle_client import kaggle_credentials_present

REPO = Path(__file__).resolve().parent.parent
COMPETITION = "fighting-malaria-with-cnns"


@pytest.fixture
def kaggle_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, Path]:
    """No Kaggle credentials anywhere: a fresh HOME, KAGGLE_CONFIG_DIR and XDG_CONFIG_HOME, no KAGGLE_* variables."""
    for key in list(os.environ):
        if key.startswith("KAGGLE_"):
            monkeypatch.delenv(key)
    dirs = {"home": tmp_path / "home", "config": tmp_path / "kaggle-config", "xdg": tmp_path / "xdg"}
    for d in dirs.values():
        d.mkdir()
    monkeypatch.setenv("HOME", str(dirs["home"]))
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(dirs["config"]))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(dirs["xdg"]))
    return dirs


def kaggle_download(out: Path, dataset: str = "") -> None:
    download(out, source="kaggle", path="", competition=COMPETITION, dataset=dataset, synthetic={}, seed=0)


@pytest.mark.parametrize("dataset", ["", "iarunava/cell-images-for-detecting-malaria"])
def test_no_credentials_explains_where_they_go(kaggle_env: dict[str, Path], tmp_path: Path, dataset: str) -> None:
    t0 = time.monotonic()
    with pytest.raises(PipelineError) as err:
        kaggle_download(tmp_path / "out", dataset)
    assert time.monotonic() - t0 < 5
    text = str(err.value)
    for needed in ("KAGGLE_API_TOKEN", "~/.kaggle/kaggle.json", "~/.kaggle/access_token", "KAGGLE_USERNAME",
                   "KAGGLE_KEY", "data.source", "local", "synthetic"):
        assert needed in text, f"{needed!r} missing from: {text}"
    # Nothing was written for the client: no config files appeared in the fake home.
    assert not any(kaggle_env["home"].rglob("*.json"))


@pytest.mark.parametrize("kind", ["username+key", "api-token"])
def test_fake_credentials_without_network_fail_cleanly(kaggle_env: dict[str, Path], tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch, kind: str,
                                                       capsys: pytest.CaptureFixture[str],
                                                       caplog: pytest.LogCaptureFixture) -> None:
    secret = f"S3CRET-{uuid.uuid4().hex}"
    if kind == "username+key":
        monkeypatch.setenv("KAGGLE_USERNAME", "someone")
        monkeypatch.setenv("KAGGLE_KEY", secret)
    else:
        monkeypatch.setenv("KAGGLE_API_TOKEN", f"KGAT_{secret}")
    caplog.set_level(logging.DEBUG)
    t0 = time.monotonic()
    try:
        kaggle_download(tmp_path / "out")
        raised: BaseException | None = None
    except BaseException as e:  # SystemExit included: the client calls exit() on bad credentials
        raised = e
    elapsed = time.monotonic() - t0
    assert isinstance(raised, PipelineError), f"expected PipelineError, got {type(raised).__name__}: {raised}"
    assert elapsed < 60, f"took {elapsed:.0f} s"
    text = str(raised)
    assert "Kaggle" in text and "data.source" in text  # says what failed and how to run offline
    captured = capsys.readouterr()
    for where, content in (("message", text), ("stdout", captured.out), ("stderr", captured.err),
                           ("log", caplog.text)):
        assert secret not in content, f"the secret leaked into {where}"


def test_cli_exits_with_one_clear_line(tmp_path: Path) -> None:
    """`python -m pipeline.download` (what dvc runs): exit 1, the error logged, no traceback, no secret."""
    secret = f"S3CRET-{uuid.uuid4().hex}"
    work = tmp_path / "work"
    work.mkdir()
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update(source="kaggle", competition="fighting-malaria-with-cnns")
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    env = {k: v for k, v in os.environ.items() if not k.startswith("KAGGLE_")}
    for name in ("home", "config", "xdg"):
        (tmp_path / name).mkdir()
    env.update(HOME=str(tmp_path / "home"), KAGGLE_CONFIG_DIR=str(tmp_path / "config"),
               XDG_CONFIG_HOME=str(tmp_path / "xdg"), KAGGLE_USERNAME="someone", KAGGLE_KEY=secret,
               PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "pipeline.download", "--out", "raw"], cwd=work, env=env,
                          capture_output=True, text=True, timeout=90)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "ERROR pipeline: Downloading Kaggle competition fighting-malaria-with-cnns failed" in proc.stderr
    assert secret not in proc.stdout + proc.stderr


# ---------------------------------------------------------------------------------------------------------------------
# kaggle_credentials_present(): every place the kaggle client reads credentials from
# ---------------------------------------------------------------------------------------------------------------------

def put(path: Path, text: str = "x") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


CASES = {
    # name: (setup, expected); setup gets (monkeypatch, dirs)
    "nothing": (lambda mp, d: None, False),
    "env token": (lambda mp, d: mp.setenv("KAGGLE_API_TOKEN", "KGAT_abc"), True),
    "env token empty": (lambda mp, d: mp.setenv("KAGGLE_API_TOKEN", ""), False),
    "username+key": (lambda mp, d: (mp.setenv("KAGGLE_USERNAME", "u"), mp.setenv("KAGGLE_KEY", "k")), True),
    "username only": (lambda mp, d: mp.setenv("KAGGLE_USERNAME", "u"), False),
    "key only": (lambda mp, d: mp.setenv("KAGGLE_KEY", "k"), False),
    # The client reads ~/.kaggle/access_token whatever KAGGLE_CONFIG_DIR says (kagglesdk.kaggle_env).
    "access_token file": (lambda mp, d: put(d["home"] / ".kaggle" / "access_token"), True),
    "access_token file, no KAGGLE_CONFIG_DIR": (
        lambda mp, d: (mp.delenv("KAGGLE_CONFIG_DIR"), put(d["home"] / ".kaggle" / "access_token")), True),
    "kaggle.json in KAGGLE_CONFIG_DIR": (lambda mp, d: put(d["config"] / "kaggle.json"), True),
    "kaggle.json in ~/.kaggle": (
        lambda mp, d: (mp.delenv("KAGGLE_CONFIG_DIR"), put(d["home"] / ".kaggle" / "kaggle.json")), True),
    "kaggle.json in XDG folder (no ~/.kaggle)": (
        lambda mp, d: (mp.delenv("KAGGLE_CONFIG_DIR"), put(d["xdg"] / "kaggle" / "kaggle.json")), True),
    # With KAGGLE_CONFIG_DIR set the client does not look for kaggle.json in ~/.kaggle.
    "kaggle.json in ~/.kaggle but KAGGLE_CONFIG_DIR elsewhere": (
        lambda mp, d: put(d["home"] / ".kaggle" / "kaggle.json"), False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_kaggle_credentials_present(kaggle_env: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
                                    case: str) -> None:
    setup, expected = CASES[case]
    assert kaggle_credentials_present() is False  # the fixture really starts from nothing
    setup(monkeypatch, kaggle_env)
    assert kaggle_credentials_present() is expected
