"""Unpacking archives and copying data folders within stated bounds, counting the bytes really written."""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import stat
import zipfile
import zlib
from pathlib import Path

from pipeline.lib.common import PipelineError, disk_full

log = logging.getLogger(__name__)

# The whole NIH set is 0.35 GB zipped and 0.7 GB unpacked: 20 GiB is room for any cell data set, not for a zip bomb.
TOTAL_CAP = 20 * 2**30
# Any one file but a nested zip: a cell image is 5-50 kB, a labels CSV under 2 MB; no cell image is 64 MB.
MEMBER_CAP = 64 * 2**20
# The NIH set has 27,558 cells (55,116 in its archive, which nests a duplicate); a million is no cell data set.
MAX_FILES = 1_000_000
# Kaggle nests train.zip in the competition's zip (depth 2); deeper than 4 is a zip bomb's nesting.
MAX_DEPTH = 4
# Left free on the disk after unpacking, for the prepare stage's cache and DVC.
DISK_MARGIN = 512 * 2**20
CHUNK = 2**20


class Budget:
    """What one download may still write: bytes (TOTAL_CAP and the free disk) and files, counted as written."""

    def __init__(self, dest: Path, cap: int | None = None, max_files: int | None = None):
        self.free = shutil.disk_usage(_existing(dest)).free - DISK_MARGIN
        self.cap, self.max_files = cap or TOTAL_CAP, max_files or MAX_FILES
        self.written = self.on_disk = self.files = 0

    def check_declared(self, nbytes: int, nfiles: int, where: str) -> None:
        """Refuse an archive whose headers already promise more than is left (before writing any of it)."""
        if self.files + nfiles > self.max_files:
            raise PipelineError(f"{where} holds {nfiles:,} files; with the {self.files:,} unpacked so far that is "
                                f"more than the {self.max_files:,} a cell data set can have. Check data.path.")
        self._check(self.written + nbytes, self.on_disk + nbytes, where, "would unpack to")

    def add(self, nbytes: int, where: str) -> None:
        self.written, self.on_disk = self.written + nbytes, self.on_disk + nbytes
        self._check(self.written, self.on_disk, where, "unpacked to")

    def add_file(self, where: str) -> None:
        self.files += 1
        if self.files > self.max_files:
            raise PipelineError(f"{where}: more than {self.max_files:,} files; a cell data set has fewer. "
                                "Check data.path.")

    def removed(self, nbytes: int) -> None:
        self.on_disk -= nbytes

    def _check(self, written: int, on_disk: int, where: str, verb: str) -> None:
        if written > self.cap:
            raise PipelineError(f"{where} {verb} more than {_size(self.cap)}, the cap on a data set "
                                "(the NIH cells are 0.7 GB): it is no cell data set, or a zip bomb. Check data.path.")
        if on_disk > self.free:
            raise PipelineError(f"{where} {verb} {_size(on_disk)} but the disk has {_size(max(self.free, 0))} free "
                                f"(keeping {_size(DISK_MARGIN)}): "
                                "free some space (DVC's cache of older runs: `dvc gc -w`) and run again.")


def _size(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB" if n >= 2**30 else f"{n / 2**20:,.1f} MB" if n >= 2**20 else f"{n:,} bytes"


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _copy_stream(src, target: Path, budget: Budget, where: str, cap: int | None) -> int:
    """Copy an open stream to target in chunks, counting every byte against `cap` and the budget."""
    n = 0
    with open(target, "wb") as out:
        while chunk := src.read(CHUNK):
            n += len(chunk)
            if cap is not None and n > cap:
                raise PipelineError(f"{where} is larger than {_size(cap)}, the cap on one file (no cell image "
                                    "or labels CSV comes near it); remove it from the archive or folder.")
            budget.add(len(chunk), where)
            out.write(chunk)
    return n


def _is_zip(name: str) -> bool:
    return name.lower().endswith(".zip")


def extract_zip(zip_path: Path, dest: Path, budget: Budget, *, label: str | None = None, depth: int = 1,
                ancestors: tuple[str, ...] = ()) -> None:
    """Extract one zip into dest and the zips inside it where they lie (removed once unpacked), within the budget,
    MAX_DEPTH and MEMBER_CAP; refuse zip-slip paths, encrypted members and zips that contain themselves. `label` names
    the archive in messages (a nested one as `outer.zip > inner.zip`)."""
    label = label or str(zip_path)
    if depth > MAX_DEPTH:
        raise PipelineError(f"{label}: zips nested more than {MAX_DEPTH} deep; a cell data set nests at most 2 "
                            "(a zip bomb nests deeper). Unpack it yourself and point data.path at the folder.")
    digest = _sha256(zip_path)
    if digest in ancestors:
        raise PipelineError(f"{label} contains itself (the same bytes as an archive it was unpacked from): a zip "
                            "quine, not a data set. Check data.path.")
    dest_root, own = dest.resolve(), zip_path.resolve()
    nested = []
    try:
        with zipfile.ZipFile(zip_path) as zf:
            infos = [i for i in zf.infolist() if not i.filename.startswith("__MACOSX/")]  # macOS resource forks
            budget.check_declared(sum(i.file_size for i in infos), len(infos), label)
            for info in infos:
                where = f"{label}: member {info.filename!r}"
                target = (dest / info.filename).resolve()
                if not target.is_relative_to(dest_root):
                    raise PipelineError(f"{label}: member {info.filename!r} escapes the archive folder.")
                if info.flag_bits & 0x1:
                    raise PipelineError(f"{where} is encrypted; the pipeline reads no password-protected archives. "
                                        "Unpack it yourself and point data.path at the folder.")
                if target == own:
                    raise PipelineError(f"{where} would overwrite the archive itself: a zip that contains itself is "
                                        "no data set; check data.path, or download it again.")
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                cap = None if _is_zip(info.filename) else MEMBER_CAP
                if cap is not None and info.file_size > cap:
                    raise PipelineError(f"{where} is {_size(info.file_size)}, more than the {_size(cap)} cap on one "
                                        "file (no cell image or labels CSV comes near it).")
                budget.add_file(where)
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    with zf.open(info) as src:
                        _copy_stream(src, target, budget, where, cap)
                except PipelineError:
                    raise
                except (zipfile.BadZipFile, EOFError, zlib.error, NotImplementedError, RuntimeError) as e:
                    raise PipelineError(f"{where} cannot be unpacked ({type(e).__name__}: {e}): the archive is "
                                        "damaged or uses a method Python's zipfile does not read; download it again, "
                                        "or unpack it yourself and point data.path at the folder.") from None
                if _is_zip(info.filename):
                    nested.append((target, info.filename))
    except zipfile.BadZipFile as e:
        raise PipelineError(f"{label} is not a valid zip file ({e}); download it again.") from None
    except OSError as e:
        if disk_full(e):
            raise
        raise PipelineError(f"{label} cannot be read ({type(e).__name__}: {e}); download it again.") from None
    for inner, name in nested:
        if inner.is_file():  # a later member of the same name may have replaced it already
            extract_zip(inner, inner.parent, budget, label=f"{label} > {name}", depth=depth + 1,
                        ancestors=(*ancestors, digest))
            budget.removed(inner.stat().st_size)
            inner.unlink()


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def unpack_nested(root: Path, budget: Budget) -> None:
    """Extract zips found under root next to where they lie, removing each once unpacked (Kaggle nests train.zip)."""
    for inner in sorted(p for p in root.rglob("*") if _is_zip(p.name) and p.is_file()):
        if inner.is_file():
            extract_zip(inner, inner.parent, budget)
            budget.removed(inner.stat().st_size)
            inner.unlink()


def copy_folder(src: Path, dest: Path, budget: Budget, _chain: tuple[Path, ...] = ()) -> None:
    """Copy a data folder within the budget, following links to folders but refusing a link back into a folder being
    copied (a loop copytree would follow until the disk or the path length gives out) and broken links."""
    try:
        real = src.resolve(strict=True)
    except (OSError, RuntimeError) as e:  # Python 3.11 raises RuntimeError for a symlink loop
        raise PipelineError(f"{src} cannot be read ({e}): a broken link or a symlink loop; remove it or point "
                            "data.path at a plain folder.") from None
    if real in _chain:
        raise PipelineError(f"{src} is a link back to {real}, a folder it is inside of (a symlink loop); remove the "
                            "link or point data.path at a plain folder.")
    dest.mkdir(parents=True, exist_ok=True)
    for entry in sorted(os.scandir(src), key=lambda e: e.name):
        path = Path(entry.path)
        try:
            mode = os.stat(path).st_mode  # follows links: what the pipeline would read
        except OSError as e:
            raise PipelineError(f"{path} cannot be read ({e.strerror or e}): a broken link or a symlink loop; remove "
                                "it or point data.path at a plain folder.") from None
        if stat.S_ISDIR(mode):
            copy_folder(path, dest / entry.name, budget, (*_chain, real))
        elif stat.S_ISREG(mode):
            where = str(path)
            budget.add_file(where)
            with open(path, "rb") as f:
                _copy_stream(f, dest / entry.name, budget, where, None if _is_zip(entry.name) else MEMBER_CAP)
        else:  # a FIFO would block the copy for ever; a device or socket is no data
            raise PipelineError(f"{path} is neither a file nor a folder (a pipe, socket or device); remove it from "
                                "data.path.")
