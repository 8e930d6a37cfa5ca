"""Build the demo bundle (not a stage): `python -m pipeline.tools.demo_bundle` turns ../shared/data/cell_images-sample.zip
into data/demo.zip, 1,000 real NIH cells at 64 px in the public layout, the default run's data."""
from __future__ import annotations

import argparse
import hashlib
import io
import logging
import zipfile
from pathlib import Path

from PIL import Image

from pipeline.lib.common import PipelineError, is_image_file, run_main
from pipeline.lib.images import decode, open_image, to_rgb

log = logging.getLogger(__name__)

CLASSES = ("Parasitized", "Uninfected")
SIZE = 64  # the default data.img_size: prepare then decodes the cells as they are
FIXED_TIME = (2020, 1, 1, 0, 0, 0)  # zip entries carry no build time, so a rebuild has the same bytes


def cells(source_zip: Path) -> dict[str, tuple[str, bytes]]:
    """name -> (class, PNG bytes) of each unique cell in the public-layout zip (nested duplicates dropped)."""
    out: dict[str, tuple[str, bytes]] = {}
    with zipfile.ZipFile(source_zip) as z:
        for info in sorted(z.infolist(), key=lambda i: (i.filename.count("/"), i.filename)):  # shallowest first
            parts = Path(info.filename).parts
            if info.is_dir() or len(parts) < 2 or parts[-2] not in CLASSES or not is_image_file(Path(parts[-1])):
                continue
            out.setdefault(parts[-1], (parts[-2], z.read(info)))
    return out


def png64(data: bytes) -> bytes:
    """The cell resized to SIZE x SIZE RGB as prepare resizes (bilinear), as a PNG."""
    small = Image.fromarray(decode(io.BytesIO(data), SIZE)[0])
    buf = io.BytesIO()
    small.save(buf, "PNG", optimize=True)
    return buf.getvalue()


def build(source_zip: Path, out: Path) -> int:
    """Write the bundle; returns the number of cells."""
    if not source_zip.is_file():
        raise PipelineError(f"{source_zip} is missing: the demo is built from the shared NIH sample.")
    found = cells(source_zip)
    if not found:
        raise PipelineError(f"{source_zip} has no cell_images/{{Parasitized,Uninfected}}/ images.")
    out.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:  # PNGs are compressed already
        for name in sorted(found):
            cls, data = found[name]
            z.writestr(zipfile.ZipInfo(f"cell_images/{cls}/{name}", FIXED_TIME), png64(data))
    return len(found)


def content_digest(bundle: Path) -> str:
    """sha256 over every entry's name and decoded pixels: the same for any zlib that encodes the PNGs."""
    h = hashlib.sha256()
    with zipfile.ZipFile(bundle) as z:
        for name in sorted(z.namelist()):
            with open_image(io.BytesIO(z.read(name))) as im:
                h.update(name.encode() + to_rgb(im).tobytes())
    return h.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--source", type=Path, default=Path("../shared/data/cell_images-sample.zip"))
    parser.add_argument("--out", type=Path, default=Path("data/demo.zip"))
    args = parser.parse_args()
    n = build(args.source, args.out)
    log.info("Wrote %s: %d cells, %.2f MB, content sha256 %s", args.out, n, args.out.stat().st_size / 1e6,
             content_digest(args.out))


if __name__ == "__main__":
    run_main(main)
