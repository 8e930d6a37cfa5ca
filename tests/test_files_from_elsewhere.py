"""Files from elsewhere (issue 41): only the PNG and JPEG decoders run, 16-bit and alpha images keep their real values,
archives and data folders are bounded, no user file is deleted, and every bad input is one PipelineError."""
from __future__ import annotations

import io
import os
import shutil
import struct
import subprocess
import sys
import zipfile
import zlib
from collections import namedtuple
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from helpers import dvc, linked_user_folder, project_copy, set_params
from pipeline.lib import archives
from pipeline.lib.common import OUTPUT_MARKER, PipelineError
from pipeline.download import download
from pipeline.lib.images import BACKGROUND, MAX_PIXELS, NotAnImage, decode, to_rgb
from pipeline.prepare import prepare
from pipeline.validate import check_data_path

ROOT = Path(__file__).resolve().parents[1]
SIZE = 32


def originals(shared_data: Path, n: int = 3) -> list[Path]:
    return sorted((shared_data / "originals").rglob("*.png"))[:n]


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png(path: Path, rows: bytes, w: int, h: int, bit_depth: int, color_type: int) -> Path:
    """A PNG written by hand from its filtered rows (Pillow writes no 16-bit colour and no huge bilevel image fast)."""
    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows)) +
                     chunk(b"IEND", b""))
    return path


def png16(path: Path, pixels: np.ndarray, color_type: int) -> Path:
    """A 16-bit PNG (grey 0, RGB 2 or RGBA 6) of uint16 pixels."""
    h, w = pixels.shape[:2]
    rows = pixels.astype(">u2").reshape(h, -1)
    return png(path, b"".join(b"\0" + r.tobytes() for r in rows), w, h, 16, color_type)


def decoded(path_or_image, size: int = SIZE) -> np.ndarray:
    if isinstance(path_or_image, Image.Image):
        buf = io.BytesIO()
        path_or_image.save(buf, "PNG")
        buf.seek(0)
        return decode(buf, size)[0]
    return decode(path_or_image, size)[0]


# ---------------------------------------------------------------------------------------------------------------------
# Decoders: PNG and JPEG only; 16-bit scaled; alpha composited on black
# ---------------------------------------------------------------------------------------------------------------------

def foreign_files(tmp_path: Path) -> dict[str, Path]:
    """Files named .png that hold something else: PostScript (Ghostscript would run it) and formats Pillow reads."""
    out = {"eps": tmp_path / "eps.png"}
    out["eps"].write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n0 0 moveto 8 8 lineto stroke\n")
    cell = Image.new("RGB", (8, 8), (200, 100, 50))
    for fmt in ("GIF", "BMP", "TIFF", "PPM", "ICO", "WEBP"):
        out[fmt] = tmp_path / f"{fmt.lower()}.png"
        cell.save(out[fmt], fmt)
    return out


def test_only_png_and_jpeg_decoders_run_whatever_the_name(tmp_path):
    for kind, path in foreign_files(tmp_path).items():
        with pytest.raises(NotAnImage, match="not an image: neither PNG nor JPEG") as e:
            decode(path, SIZE)
        assert kind != "eps" or "%!PS" in str(e.value)
    # What decides is the content, among the two allowed: a JPEG named .png and a PNG named .jpg both decode.
    cell = Image.new("RGB", (8, 8), (200, 100, 50))
    cell.save(tmp_path / "jpeg.png", "JPEG")
    cell.save(tmp_path / "png.jpg", "PNG")
    assert decoded(tmp_path / "jpeg.png").shape == decoded(tmp_path / "png.jpg").shape == (SIZE, SIZE, 3)


def test_prepare_names_a_file_that_is_not_an_image(make_competition, tmp_path):
    raw = make_competition()
    name = sorted((raw / "train").iterdir())[0]
    Image.open(name).convert("RGB").save(name, "BMP")  # a BMP under a .png name
    with pytest.raises(PipelineError, match=f"{name.name} \\(train\\): not an image: neither PNG nor JPEG"):
        prepare(raw, tmp_path / "prepared", img_size=SIZE, holdout_fraction=0.15, seed=0)


def test_16_bit_images_decode_to_their_real_values(shared_data, tmp_path):
    """Against the 8-bit original: its grey (L) and its colours, written as 16-bit PNGs (value x 257), decode alike."""
    for i, path in enumerate(originals(shared_data)):
        rgb = np.asarray(Image.open(path).convert("RGB"))
        grey = np.asarray(Image.open(path).convert("L"))
        Image.fromarray((grey.astype(np.uint16) * 257)).save(tmp_path / f"{i}_I16.png")  # Pillow's I;16
        assert Image.open(tmp_path / f"{i}_I16.png").mode.startswith("I")
        assert np.array_equal(decoded(tmp_path / f"{i}_I16.png"), decoded(Image.fromarray(grey))), path.name
        grey16 = png16(tmp_path / f"{i}_grey16.png", grey.astype(np.uint16) * 257, 0)
        assert np.array_equal(decoded(grey16), decoded(Image.fromarray(grey))), path.name
        rgb16 = png16(tmp_path / f"{i}_rgb16.png", rgb.astype(np.uint16) * 257, 2)
        assert np.array_equal(decoded(rgb16), decoded(path)), path.name
    # Not clipped: a mid-grey 16-bit cell stays mid-grey (the old decoding made it white).
    mid = png16(tmp_path / "mid.png", np.full((16, 16), 32768, np.uint16), 0)
    assert np.all(decoded(mid) == 128)


def test_alpha_is_composited_on_black_as_the_nih_padding(shared_data, tmp_path):
    """Against the 8-bit original: its black padding made transparent (with white behind it in the file) decodes to
    the original, in RGBA, LA, a palette with a transparent entry and 16-bit RGBA."""
    assert BACKGROUND == (0, 0, 0)
    for i, path in enumerate(originals(shared_data)):
        rgb = np.asarray(Image.open(path).convert("RGB"))
        pad = (rgb == 0).all(-1)
        assert pad.mean() > 0.1  # the NIH padding really is black
        rgba = np.dstack([np.where(pad[..., None], 255, rgb), np.where(pad, 0, 255)]).astype(np.uint8)
        assert np.array_equal(decoded(Image.fromarray(rgba)), decoded(path)), path.name
        rgba16 = png16(tmp_path / f"{i}_rgba16.png", rgba.astype(np.uint16) * 257, 6)
        assert np.array_equal(decoded(rgba16), decoded(path)), path.name
        grey = np.asarray(Image.open(path).convert("L"))
        la = Image.fromarray(np.dstack([np.where(pad, 255, grey), np.where(pad, 0, 255)]).astype(np.uint8))
        assert la.mode == "LA"
        assert np.array_equal(decoded(la), decoded(Image.fromarray(grey))), path.name
        pal = Image.open(path).convert("P", palette=Image.Palette.ADAPTIVE, colors=255)
        index = np.asarray(pal).copy()
        index[pad] = 255  # an entry of its own, white and transparent
        pal_t = Image.frombytes("P", pal.size, index.tobytes())
        pal_t.putpalette((pal.getpalette() + [0] * 768)[:765] + [255, 255, 255])
        pal_t.info["transparency"] = 255
        expected = np.asarray(pal.convert("RGB")).copy()
        expected[pad] = 0
        assert np.array_equal(decoded(pal_t), decoded(Image.fromarray(expected))), path.name
    # Half transparent: each value about halved (composited), not kept as it is (alpha dropped).
    cell = np.asarray(Image.open(originals(shared_data, 1)[0]).convert("RGB"))
    half = to_rgb(Image.fromarray(np.dstack([cell, np.full(cell.shape[:2], 128, np.uint8)])))
    assert np.abs(np.asarray(half).astype(int) - np.rint(cell.astype(int) * 128 / 255)).max() <= 1


def test_decompression_bombs_are_refused_before_decoding(tmp_path):
    """Pillow only warns between 89 M and 179 M pixels; here anything above MAX_PIXELS is refused, unread."""
    w = h = 9500  # 90 M pixels, a bilevel PNG of 11 MB of zeros, 12 kB on disk
    bomb = png(tmp_path / "bomb.png", (b"\0" + bytes((w + 7) // 8)) * h, w, h, 1, 0)
    assert bomb.stat().st_size < 100_000
    with pytest.raises(NotAnImage, match="not a cell image: .*pixels"):
        decode(bomb, SIZE)
    # Outside pytest (which resets warning filters per test), Pillow's own warning is the error, and nothing is warned.
    code = f"from pipeline.lib.images import decode\ndecode({str(bomb)!r}, 32)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert "NotAnImage: not a cell image: Image size (90250000 pixels) exceeds limit" in r.stderr, r.stderr[-2000:]
    assert "Warning" not in r.stderr.replace("DecompressionBombWarning:", "")
    side = int(MAX_PIXELS ** 0.5) + 1  # just over the cap, well under Pillow's own threshold
    big = png(tmp_path / "big.png", (b"\0" + bytes((side + 7) // 8)) * side, side, side, 1, 0)
    with pytest.raises(NotAnImage, match=f"not a cell image: {side} x {side} pixels, more than"):
        decode(big, SIZE)


# ---------------------------------------------------------------------------------------------------------------------
# Archives and data folders: bounded, counted as written, every refusal naming the archive and the member
# ---------------------------------------------------------------------------------------------------------------------

def zip_of(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def fetch(src: Path, tmp_path: Path, out: str = "downloaded") -> Path:
    download(tmp_path / out, source="local", path=str(src), competition="", dataset="", synthetic={}, seed=0)
    return tmp_path / out


def patch_headers(path: Path, *, flag: int | None = None, size: int | None = None) -> None:
    """Rewrite every local and central header of a zip: set general-purpose flag bits, or declare another
    uncompressed size (what a crafted archive's headers may say)."""
    data = bytearray(path.read_bytes())
    for sig, flag_at, size_at in ((b"PK\x03\x04", 6, 22), (b"PK\x01\x02", 8, 24)):
        at = data.find(sig)
        while at >= 0:
            if flag is not None:
                data[at + flag_at:at + flag_at + 2] = struct.pack("<H", struct.unpack_from("<H", data, at + flag_at)[0]
                                                                  | flag)
            if size is not None:
                data[at + size_at:at + size_at + 4] = struct.pack("<I", size)
            at = data.find(sig, at + 4)
    path.write_bytes(bytes(data))


def test_a_nested_zip_bomb_is_refused_by_the_bytes_it_would_write(tmp_path, monkeypatch):
    monkeypatch.setattr(archives, "TOTAL_CAP", 3 * 2**20)
    inner = zip_of(tmp_path / "inner.zip", {f"cell{i}.png": bytes(2**20) for i in range(4)})  # 4 MB of zeros
    outer = zip_of(tmp_path / "outer.zip", {"train.zip": inner.read_bytes()})
    assert outer.stat().st_size < 50_000
    with pytest.raises(PipelineError, match=r"outer\.zip > train\.zip would unpack to more than 3\.0 MB"):
        fetch(outer, tmp_path)
    assert not (tmp_path / "raw").exists() and not list(tmp_path.glob(".raw*"))


def test_the_free_disk_bounds_an_unpacking(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(archives.shutil, "disk_usage", lambda p: usage(0, 0, archives.DISK_MARGIN + 2**20))
    src = zip_of(tmp_path / "big.zip", {"train_labels.csv": b"img_name,label\n", "a.png": bytes(2 * 2**20)})
    with pytest.raises(PipelineError, match=r"big\.zip would unpack to 2\.0 MB but the disk has 1\.0 MB free"):
        fetch(src, tmp_path)


def test_headers_that_understate_sizes_are_caught_by_the_bytes_written(tmp_path):
    src = zip_of(tmp_path / "liar.zip", {"train/a.png": bytes(2**20)})
    patch_headers(src, size=10)  # the headers say 10 bytes; the data inflates to 1 MB
    with pytest.raises(PipelineError, match=r"liar\.zip: member 'train/a\.png' cannot be unpacked") as e:
        fetch(src, tmp_path)
    assert "download it again" in str(e.value)


def test_a_member_too_large_for_a_cell_and_too_many_members_are_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(archives, "MEMBER_CAP", 1000)
    src = zip_of(tmp_path / "one.zip", {"train/a.png": bytes(10), "train/huge.png": bytes(5000)})
    with pytest.raises(PipelineError, match=r"one\.zip: member 'train/huge\.png' is .* more than the .* cap on one"):
        fetch(src, tmp_path)
    monkeypatch.setattr(archives, "MAX_FILES", 5)
    many = zip_of(tmp_path / "many.zip", {f"train/{i}.png": b"x" for i in range(8)})
    with pytest.raises(PipelineError, match=r"many\.zip holds 8 files; .* more than the 5"):
        fetch(many, tmp_path)


def test_zips_nested_too_deep_are_refused(tmp_path):
    data = zip_of(tmp_path / "z0.zip", {"cell.png": b"x"}).read_bytes()
    for depth in range(1, 6):
        data = zip_of(tmp_path / f"z{depth}.zip", {f"level{depth}.zip": data}).read_bytes()
    with pytest.raises(PipelineError, match=r"z5\.zip > level5\.zip > .* nested more than 4 deep"):
        fetch(tmp_path / "z5.zip", tmp_path)


def test_an_encrypted_member_is_named(tmp_path):
    src = zip_of(tmp_path / "locked.zip", {"train_labels.csv": b"img_name,label\n", "train/a.png": b"x" * 100})
    patch_headers(src, flag=0x1)
    with pytest.raises(PipelineError, match=r"locked\.zip: member 'train_labels\.csv' is encrypted"):
        fetch(src, tmp_path)


def test_a_zip_that_contains_itself_is_named(tmp_path):
    """train.zip holding a train.zip: unpacked where it lies, it would overwrite itself while being read."""
    inner = zip_of(tmp_path / "inner.zip", {"train.zip": b"PK\x05\x06" + bytes(18), "cell.png": b"x"})
    outer = zip_of(tmp_path / "bundle.zip", {"train.zip": inner.read_bytes()})
    with pytest.raises(PipelineError, match=r"bundle\.zip > train\.zip: member 'train\.zip' would overwrite the "
                                            r"archive itself"):
        fetch(outer, tmp_path)


def test_a_symlink_loop_in_a_data_folder_is_named(make_competition, tmp_path):
    raw = make_competition("src")
    (raw / "train" / "again").symlink_to(raw, target_is_directory=True)  # copytree would follow it for ever
    with pytest.raises(PipelineError, match=r"again is a link back to .*symlink loop"):
        fetch(raw, tmp_path)
    (raw / "train" / "again").unlink()
    (raw / "train" / "self").symlink_to(raw / "train" / "self")  # a link to itself: ELOOP
    with pytest.raises(PipelineError, match=r"self cannot be read .*symlink loop"):
        fetch(raw, tmp_path)
    (raw / "train" / "self").unlink()
    (raw / "linked").symlink_to(raw / "train", target_is_directory=True)
    assert (fetch(raw, tmp_path) / "linked").is_dir()  # a linked folder without a loop is copied


def test_an_empty_img_name_is_named_with_its_line(make_competition, tmp_path):
    raw = make_competition()
    csv = raw / "train_labels.csv"
    labels = pd.read_csv(csv, dtype=str)
    labels.loc[2, "img_name"] = ""
    labels.to_csv(csv, index=False)
    with pytest.raises(PipelineError, match=r"train_labels\.csv: empty img_name at lines 4"):
        prepare(raw, tmp_path / "prepared", img_size=SIZE, holdout_fraction=0.15, seed=0)


# ---------------------------------------------------------------------------------------------------------------------
# No stage deletes a file it did not write
# ---------------------------------------------------------------------------------------------------------------------

def test_a_linked_data_raw_is_written_only_when_empty_or_ours(make_competition, tmp_path):
    src = make_competition("src")
    mine, link = linked_user_folder(tmp_path, b"the user's own download")
    with pytest.raises(PipelineError, match="holds files this pipeline did not write"):
        fetch(src, tmp_path, "raw")
    assert (mine / "competition.zip").read_bytes() == b"the user's own download"
    (mine / "competition.zip").unlink()  # empty: written, and marked as the pipeline's
    fetch(src, tmp_path, "raw")
    assert link.is_symlink() and (mine / OUTPUT_MARKER).is_file() and (mine / "train").is_dir()
    fetch(src, tmp_path, "raw")  # ours now: replaced again
    assert link.is_symlink() and (mine / OUTPUT_MARKER).is_file()


def test_data_path_inside_equal_or_above_an_output_is_refused(monkeypatch):
    monkeypatch.chdir(ROOT)  # data.path is relative to the project root, where DVC runs the stage
    dvc_yaml = ROOT / "dvc.yaml"
    for path, relation in (("data/raw/competition.zip", "inside data/raw"), ("data/raw", "the same folder as data/raw"),
                           (".", "a folder above"), ("data", "a folder above")):
        with pytest.raises(PipelineError, match=f"data.path {path} is {relation}"):
            check_data_path({"source": "local", "path": path}, dvc_yaml)
    for path in ("data/demo.zip", "../shared/data/nndl-hw2-sample.zip"):  # beside the outputs: fine
        check_data_path({"source": "local", "path": path}, dvc_yaml)
    check_data_path({"source": "kaggle", "path": "."}, dvc_yaml)  # not read by that source


def test_dvc_repro_refuses_a_data_path_in_data_raw_before_deleting_it(tmp_path):
    """Through DVC, which deletes a stage's outputs before running it: the validate stage stops first."""
    project = project_copy(tmp_path, **{"data.source": "local", "data.path": "data/raw/competition.zip",
                                        "train.backbones": ["resnet10t"], "distill.student": "resnet10t"})
    user_zip = project / "data/raw/competition.zip"
    user_zip.parent.mkdir(parents=True)
    user_zip.write_bytes(b"the user's own download")
    r = dvc(project, "repro", "download", ok=False)
    assert "data.path data/raw/competition.zip is inside data/raw" in r.stdout + r.stderr, r.stdout + r.stderr
    assert user_zip.read_bytes() == b"the user's own download"
    set_params(project, **{"data.path": "."})
    r = dvc(project, "repro", "download", ok=False)
    assert "data.path . is a folder above" in r.stdout + r.stderr, r.stdout + r.stderr
    assert user_zip.read_bytes() == b"the user's own download"


# ---------------------------------------------------------------------------------------------------------------------
# predict: members streamed and capped, bad ones named; -o written whole
# ---------------------------------------------------------------------------------------------------------------------

def test_predict_streams_zip_members_and_names_the_bad_ones(shared_data, tmp_path, monkeypatch):
    from pipeline import predict

    cells = originals(shared_data, 4)
    members = {f"in/{p.name}": p.read_bytes() for p in cells}
    largest = max(cells, key=lambda p: p.stat().st_size)
    members["in/huge.png"] = largest.read_bytes() + bytes(4000)  # a cell, then 4 kB past the cap
    src = zip_of(tmp_path / "cells.zip", members)
    locked = zip_of(tmp_path / "locked.zip", {"x/a.png": cells[0].read_bytes()})
    patch_headers(locked, flag=0x1)
    monkeypatch.setattr(predict, "MEMBER_CAP", largest.stat().st_size + 1000)

    def no_whole_reads(*a, **k):
        raise AssertionError("a member was read whole into memory")
    monkeypatch.setattr(zipfile.ZipFile, "read", no_whole_reads)
    sources, other, _ = predict.collect([str(src), str(locked)])
    images, errors = predict.decode_sources(sources, SIZE, 2)
    bad = {s.where: e for s, e in zip(sources, errors) if e}
    assert set(bad) == {f"{src}:in/huge.png", f"{locked}:x/a.png"}, bad
    assert "more than the" in bad[f"{src}:in/huge.png"] and "encrypted" in bad[f"{locked}:x/a.png"]
    by_name = {s.name: images[i] for i, s in enumerate(sources)}
    for p in cells:
        assert np.array_equal(by_name[p.name], decoded(p)), p.name


def test_predict_names_foreign_files_and_bombs(tmp_path):
    from pipeline import predict

    folder = tmp_path / "in"
    folder.mkdir()
    for kind, path in foreign_files(tmp_path).items():
        shutil.move(path, folder / path.name)
    w = h = 9500
    png(folder / "bomb.png", (b"\0" + bytes((w + 7) // 8)) * h, w, h, 1, 0)
    sources, _, _ = predict.collect([str(folder)])
    _, errors = predict.decode_sources(sources, SIZE, 2)
    named = dict(zip((s.name for s in sources), errors))
    assert "not a cell image" in named.pop("bomb.png")
    assert all(e and "not an image: neither PNG nor JPEG" in e for e in named.values()), named


def test_predict_output_is_written_whole(shared_data, tmp_path, monkeypatch):
    """A run killed while writing -o leaves the last complete CSV, never half a table."""
    from pipeline import predict

    out = tmp_path / "pred.csv"
    out.write_text("img_name,prob,label\nold.png,0.5,1\n")
    monkeypatch.setattr(predict, "image_size", lambda *a: SIZE)
    monkeypatch.setattr(predict.onnx_io, "load_manifest", lambda d: {"threshold": 0.5})
    monkeypatch.setattr(predict, "onnx_probs", lambda images, *a, **k: np.full(len(images), 0.7))
    real = pd.DataFrame.to_csv

    def killed(self, path_or_buf=None, **kw):
        if path_or_buf is None or path_or_buf is sys.stdout:
            return real(self, path_or_buf, **kw)
        with open(path_or_buf, "w") as f:
            f.write("img_name,prob,label\n")  # the header, then the kill
        raise KeyboardInterrupt
    monkeypatch.setattr(pd.DataFrame, "to_csv", killed)
    monkeypatch.setattr(sys, "argv", ["predict", *map(str, originals(shared_data, 2)), "-o", str(out)])
    try:
        predict.main()
    except KeyboardInterrupt:
        pass
    text = out.read_text()
    assert text in ("img_name,prob,label\nold.png,0.5,1\n",) or len(text.splitlines()) == 3, text
    assert not list(tmp_path.glob(".pred.csv.partial"))


# ---------------------------------------------------------------------------------------------------------------------
# The export: its files replaced as one set
# ---------------------------------------------------------------------------------------------------------------------

def test_a_killed_export_leaves_the_last_complete_set(make_competition, download_prepare, tmp_path, monkeypatch):
    from pipeline import export as ex
    from pipeline.lib.checkpoints import save_checkpoint
    from pipeline.lib.models import create_model
    from pipeline.lib.tta import TTASpec

    p = download_prepare(make_competition(), tmp_path / "work", img_size=SIZE)
    student = tmp_path / "student"
    student.mkdir()
    save_checkpoint(student / "checkpoint.pt", create_model("resnet10t").eval(), arch="resnet10t",
                    params={"img_size": SIZE}, epoch=1, metric={})
    out = tmp_path / "export"
    out.mkdir()
    old = {name: f"old {name}".encode() for name in ("student.onnx", "student.int8.onnx", "model.json", "scores.json",
                                                      "metrics.json")}
    for name, data in old.items():
        (out / name).write_bytes(data)
    (out / "notes.txt").write_text("the user's notes")

    def new_fp32(model, size, path):
        path.write_bytes(b"new fp32 model")

    def killed(*a, **k):
        raise KeyboardInterrupt  # after the new fp32 model is written, before the int8 one and the manifest
    monkeypatch.setattr(ex, "to_onnx", new_fp32)
    monkeypatch.setattr(ex, "to_int8", killed)
    with pytest.raises(KeyboardInterrupt):
        ex.export(p.out, student, out, tta=TTASpec(("identity",), 0.875))
    assert {f.name: f.read_bytes() for f in out.iterdir() if f.name in old} == old
    assert (out / "notes.txt").read_text() == "the user's notes"
    assert not list(tmp_path.glob(".export*"))
    new = tmp_path / "new"
    new.mkdir()
    ex.keep_others(out, new)  # a successful swap carries the user's files over
    assert sorted(f.name for f in new.iterdir()) == ["notes.txt"]
