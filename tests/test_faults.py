"""Files a later run trusts are written whole or not at all: a full disk (simulated with RLIMIT_FSIZE, which makes a
write fail with EFBIG, or an ENOSPC raised on purpose) or a kill mid-write leaves the last good files and no
temporary one, and a full disk is one message naming the path and about how much space it needs."""
from __future__ import annotations

import errno
import hashlib
import re
import resource
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import linked_user_folder
from pipeline.lib.common import OUTPUT_MARKER, PipelineError, written_whole
from pipeline.download import download
from pipeline.lib.checkpoints import read_checkpoint, save_checkpoint
from pipeline.lib.models import create_model
from pipeline.prepare import prepare


@contextmanager
def file_size_limit(n_bytes: int):
    """No file of this process may grow past n_bytes while inside (Python ignores SIGXFSZ: writes fail with EFBIG)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (n_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if ".partial" in p.name]


def test_a_full_disk_while_writing_the_cache_keeps_the_last_good_one(make_competition, tmp_path):
    raw = make_competition(n_train=40, n_test=10, n_hidden=10)
    out = tmp_path / "prepared"
    prepare(raw, out, img_size=32, holdout_fraction=0.15, seed=0)
    good = digests(out)
    with file_size_limit(64 * 1024), pytest.raises(PipelineError) as e:  # the 128 px cache is 2.8 MB
        prepare(raw, out, img_size=128, holdout_fraction=0.15, seed=0)
    needed = 60 * 128 * 128 * 3 / 2**20  # 40 + 10 + 10 cells, uint8 RGB
    assert str(out) in str(e.value) and "MB are free" in str(e.value), e.value
    assert abs(float(re.search(r"about ([\d.]+) MB", str(e.value)).group(1)) - needed) < 0.1
    assert digests(out) == good and not leftovers(tmp_path)


def test_a_kill_while_unpacking_leaves_the_last_raw_folder(make_competition, tmp_path, monkeypatch):
    import pipeline.download as dl

    out = tmp_path / "raw_out"
    download(out, source="local", path=str(make_competition()), competition="", dataset="", synthetic={}, seed=0)
    good = digests(out)

    def killed(*a, **k):
        raise KeyboardInterrupt  # as a Ctrl-C or DVC's SIGTERM would, half-way through
    monkeypatch.setattr(dl, "unpack_nested", killed)
    with pytest.raises(KeyboardInterrupt):
        download(out, source="local", path=str(make_competition("other", seed=1)), competition="", dataset="",
                 synthetic={}, seed=0)
    assert digests(out) == good and not leftovers(tmp_path)


def test_a_full_disk_while_saving_a_checkpoint_keeps_the_last_one(tmp_path):
    model = create_model("resnet10t")
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, model, arch="resnet10t", params={}, epoch=1, metric={})
    good = path.read_bytes()
    with torch.no_grad():
        next(model.parameters()).add_(1)
    with file_size_limit(1024 * 1024), pytest.raises(PipelineError) as e:  # the checkpoint is ~19 MB
        save_checkpoint(path, model, arch="resnet10t", params={}, epoch=2, metric={})
    assert str(path) in str(e.value) and "MB" in str(e.value)
    assert path.read_bytes() == good and read_checkpoint(path)["epoch"] == 1 and not leftovers(tmp_path)


def test_enospc_while_writing_a_submission_keeps_the_last_one(tmp_path):
    path = tmp_path / "student.csv"
    path.write_text("img_name,label\na.png,1\n")
    with pytest.raises(PipelineError, match=r"disk is full.*student\.csv"):
        with written_whole(path) as tmp:
            tmp.write_text("img_name,label\n")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert path.read_text() == "img_name,label\na.png,1\n" and not leftovers(tmp_path)


def test_any_other_error_passes_through_and_a_success_replaces_the_file(tmp_path):
    path = tmp_path / "scores.json"
    with pytest.raises(ValueError):
        with written_whole(path) as tmp:
            tmp.write_text("{")
            raise ValueError("a bug, not a full disk")
    assert not path.exists() and not leftovers(tmp_path)
    with written_whole(path) as tmp:
        np.save(tmp.open("wb"), np.zeros(3))
    assert path.is_file() and not leftovers(tmp_path)


def test_a_folder_linked_to_another_disk_is_replaced_there_and_the_link_kept(tmp_path):
    big = tmp_path / "big" / "prepared"
    big.mkdir(parents=True)
    link = tmp_path / "prepared"
    link.symlink_to(big, target_is_directory=True)
    for text in ("old", "new"):  # empty, then the pipeline's own (its marker): replaced there both times
        with written_whole(link) as tmp:
            tmp.mkdir()
            (tmp / f"{text}.txt").write_text(text)
        assert link.is_symlink() and sorted(p.name for p in link.iterdir()) == [OUTPUT_MARKER, f"{text}.txt"]
    assert not leftovers(tmp_path) and not list(tmp_path.rglob(".*.old"))


def test_a_linked_folder_holding_someone_elses_files_is_not_replaced(tmp_path):
    mine, link = linked_user_folder(tmp_path, b"the user's")
    with pytest.raises(PipelineError, match="holds files this pipeline did not write"):
        with written_whole(link) as tmp:
            tmp.mkdir()
    assert sorted(p.name for p in mine.iterdir()) == ["competition.zip"] and not leftovers(tmp_path)
