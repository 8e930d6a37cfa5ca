"""The demo bundle in the repo: real NIH cells, small, and exactly what `python -m pipeline.tools.demo_bundle` builds."""
from __future__ import annotations

import io
import zipfile
from pathlib import Path

from PIL import Image

from pipeline.tools.demo_bundle import build, content_digest
from pipeline.download import download
from pipeline.prepare import prepare

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "data" / "demo.zip"


def test_the_bundle_is_what_the_script_builds_from_the_shared_sample(shared_data, tmp_path):
    rebuilt = tmp_path / "demo.zip"
    assert build(shared_data / "cell_images-sample.zip", rebuilt) == 1000
    assert content_digest(rebuilt) == content_digest(BUNDLE)  # names and pixels, whatever zlib encoded them


def test_the_bundle_is_small_real_and_balanced():
    assert BUNDLE.stat().st_size <= 6_000_000
    with zipfile.ZipFile(BUNDLE) as z:
        names = z.namelist()
        sizes = {Image.open(io.BytesIO(z.read(n))).size for n in names[:50]}
    classes = [Path(n).parent.name for n in names]
    assert len(names) == 1000 and classes.count("Parasitized") == 500 and classes.count("Uninfected") == 500
    assert sizes == {(64, 64)} and all("_IMG_" in n for n in names)  # NIH names: the slide is in the name


def test_source_demo_prepares_a_slide_grouped_holdout(tmp_path):
    download(tmp_path / "raw", source="demo", path="", competition="", dataset="", synthetic={}, seed=42, demo=BUNDLE)
    df = prepare(tmp_path / "raw", tmp_path / "prepared", img_size=64, holdout_fraction=0.15, seed=42)
    counts = df["split"].value_counts().to_dict()
    assert counts["train"] + counts["test"] == 1000 and counts["hidden"] == counts["test"]
    assert not set(df.loc[df["split"] == "train", "group"]) & set(df.loc[df["split"] == "test", "group"])
