"""The download (local) -> prepare -> folds stages on the real NIH samples, and on broken inputs."""
from __future__ import annotations

import logging
import re
import shutil
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.lib.common import PipelineError
from pipeline.download import download
from pipeline.folds import make_folds
from pipeline.prepare import prepare

if TYPE_CHECKING:
    from conftest import Prepared

SMALL = 16  # img_size for the tiny synthetic sets


def expected_pixels(path: Path, size: int) -> np.ndarray:
    """What the cache should hold for one file: decoded to RGB (transparency composited on black) and resized as
    prepare documents it."""
    with Image.open(path) as im:
        if im.mode in ("RGBA", "LA"):
            im = Image.alpha_composite(Image.new("RGBA", im.size, (0, 0, 0, 255)), im.convert("RGBA"))
        return np.asarray(im.convert("RGB").resize((size, size), Image.Resampling.BILINEAR))


def run_prepare(raw: Path, tmp_path: Path, size: int = SMALL) -> pd.DataFrame:
    return prepare(raw, tmp_path / "prepared", img_size=size, holdout_fraction=0.15, seed=0)


def labels(raw: Path, csv: str = "train_labels.csv") -> pd.DataFrame:
    return pd.read_csv(raw / csv, dtype=str, keep_default_na=False)


def write_labels(raw: Path, df: pd.DataFrame, csv: str = "train_labels.csv") -> None:
    df.to_csv(raw / csv, index=False)


def msg(*parts: object) -> str:
    """A regex that finds every part, in any order, in a (possibly multi-line) message."""
    return "".join(f"(?=[\\s\\S]*{re.escape(str(p))})" for p in parts)


def warnings_text(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


# ---------------------------------------------------------------------------------------------------------------------
# Real data: the competition-layout sample (nested zips)
# ---------------------------------------------------------------------------------------------------------------------

def test_nndl_download_unpacks_nested_zips(nndl_prepared: Prepared) -> None:
    raw = nndl_prepared.raw
    assert not list(raw.rglob("*.zip"))
    for folder, n in (("train", 3000), ("test", 600), ("hidden_test", 600)):
        assert len(list((raw / folder).rglob("*.png"))) == n
    for csv in ("train_labels.csv", "test_labels.csv", "sample_submission.csv"):
        assert (raw / csv).is_file()


def test_nndl_index_splits_and_labels(nndl_prepared: Prepared) -> None:
    idx = nndl_prepared.index
    assert list(idx.columns) == ["split", "img_name", "label", "group", "width", "height", "hash", "path"]
    assert idx["split"].value_counts().to_dict() == {"train": 3000, "test": 600, "hidden": 600}
    assert idx["img_name"].is_unique
    # The index lists train, test, hidden in that order.
    assert idx["split"].tolist() == ["train"] * 3000 + ["test"] * 600 + ["hidden"] * 600
    labelled = idx[idx["split"] != "hidden"]
    assert labelled["label"].notna().all()
    assert set(labelled["label"].unique()) == {0, 1}
    for split in ("train", "test"):
        assert 0.4 < idx.loc[idx["split"] == split, "label"].mean() < 0.6
    assert idx.loc[idx["split"] == "hidden", "label"].isna().all()
    # Labels are the ones in the competition CSVs.
    raw = nndl_prepared.raw
    truth = pd.concat([pd.read_csv(raw / "train_labels.csv"), pd.read_csv(raw / "test_labels.csv")])
    merged = labelled.merge(truth, on="img_name", suffixes=("", "_csv"), validate="one_to_one")
    assert len(merged) == 3600
    assert (merged["label"] == merged["label_csv"]).all()
    # The real cells are 128 x 128 in this copy, and the native size is recorded.
    assert (idx["width"] == 128).all() and (idx["height"] == 128).all()


def test_nndl_every_image_has_its_slide_group(nndl_prepared: Prepared) -> None:
    idx = nndl_prepared.index
    expected = idx["img_name"].str.split("_IMG").str[0]
    assert (idx["group"] == expected).all()
    assert (idx["group"].str.len() > 0).all()
    assert (idx["group"] != idx["img_name"]).all()
    assert (idx["group"] != idx["img_name"].str.removesuffix(".png")).all()
    assert idx.loc[idx["split"] == "train", "group"].nunique() > 50  # many slides, not one per image or one in all


def test_nndl_cache_rows_align_with_index(nndl_prepared: Prepared) -> None:
    idx, images, size = nndl_prepared.index, nndl_prepared.images, nndl_prepared.img_size
    assert images.shape == (4200, size, size, 3)
    assert images.dtype == np.uint8
    rows = [0, 1, 2999, 3000, 3599, 3600, 4199, *np.random.default_rng(0).choice(4200, 3, replace=False)]
    for i in rows:
        src = nndl_prepared.raw / idx["path"].iat[i]
        assert src.name == idx["img_name"].iat[i]
        assert np.array_equal(images[i], expected_pixels(src, size)), f"row {i} ({src.name}) is not its image"
    # ...and a neighbour's pixels do not match (so the check above can fail).
    assert not np.array_equal(images[1], expected_pixels(nndl_prepared.raw / idx["path"].iat[2], size))


def test_nndl_sample_submission(nndl_prepared: Prepared) -> None:
    sub = pd.read_csv(nndl_prepared.out / "sample_submission.csv")
    hidden = nndl_prepared.index.loc[nndl_prepared.index["split"] == "hidden", "img_name"]
    assert list(sub.columns) == ["img_name", "label"]
    assert len(sub) == 600
    assert sub["img_name"].is_unique
    assert sorted(sub["img_name"]) == sorted(hidden)


# ---------------------------------------------------------------------------------------------------------------------
# Folds on the real competition sample
# ---------------------------------------------------------------------------------------------------------------------

def check_folds(folds: pd.DataFrame, index: pd.DataFrame, n: int) -> None:
    train = index[index["split"] == "train"]
    assert len(folds) == len(train)
    assert folds["img_name"].is_unique
    assert set(folds["img_name"]) == set(train["img_name"])
    assert sorted(folds["fold"].unique()) == list(range(n))
    merged = folds.merge(train[["img_name", "label"]], on="img_name", suffixes=("", "_index"))
    assert (merged["label"] == merged["label_index"]).all()
    rate = folds["label"].mean()
    for k, part in folds.groupby("fold"):
        assert abs(part["label"].mean() - rate) <= 0.02, f"fold {k} positive rate {part['label'].mean():.3f}"
        assert len(part) > 0.8 * len(folds) / n


def test_folds_grouped_by_patient(nndl_prepared: Prepared) -> None:
    folds = make_folds(nndl_prepared.index, n=5, group_by="patient", seed=42)
    check_folds(folds, nndl_prepared.index, 5)
    spans = folds.groupby("group")["fold"].nunique()
    assert spans.max() == 1, f"slides in more than one fold: {list(spans[spans > 1].index[:5])}"
    # Deterministic for a seed, different for another.
    assert make_folds(nndl_prepared.index, n=5, group_by="patient", seed=42)["fold"].equals(folds["fold"])
    assert not make_folds(nndl_prepared.index, n=5, group_by="patient", seed=7)["fold"].equals(folds["fold"])


def test_folds_ungrouped(nndl_prepared: Prepared) -> None:
    folds = make_folds(nndl_prepared.index, n=5, group_by="none", seed=42)
    check_folds(folds, nndl_prepared.index, 5)
    assert folds["fold"].value_counts().max() - folds["fold"].value_counts().min() <= 1
    # StratifiedKFold ignores slides: with 200 slides some of them do span folds.
    assert folds.groupby("group")["fold"].nunique().max() > 1


def test_folds_more_folds_than_slides(nndl_prepared: Prepared) -> None:
    n_groups = nndl_prepared.index.loc[nndl_prepared.index["split"] == "train", "group"].nunique()
    with pytest.raises(PipelineError, match=msg(f"folds.n={n_groups + 1}", f"only {n_groups} slides")):
        make_folds(nndl_prepared.index, n=n_groups + 1, group_by="patient", seed=0)


def test_folds_bad_group_by(nndl_prepared: Prepared) -> None:
    with pytest.raises(PipelineError, match=msg("folds.group_by", "'slide'")):
        make_folds(nndl_prepared.index, n=5, group_by="slide", seed=0)


# ---------------------------------------------------------------------------------------------------------------------
# Real data: the public cell_images layout, and native-size originals
# ---------------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cell_prepared(shared_data: Path, tmp_path_factory: pytest.TempPathFactory, download_prepare) -> Prepared:
    return download_prepare(shared_data / "cell_images-sample.zip", tmp_path_factory.mktemp("cells"),
                                holdout=0.15)


def test_public_layout_dedups_and_ignores_junk(cell_prepared: Prepared) -> None:
    raw, idx = cell_prepared.raw, cell_prepared.index
    # The quirks are really there in the raw folder...
    assert (raw / "cell_images" / "cell_images" / "Parasitized").is_dir()
    assert len(list(raw.rglob("Thumbs.db"))) == 2
    assert len(list(raw.rglob("*.png"))) == 2000
    # ...and the index keeps one copy of each image.
    labelled = idx[idx["split"].isin(["train", "test"])]
    assert len(labelled) == 1000
    assert labelled["img_name"].is_unique
    assert labelled["label"].value_counts().to_dict() == {0: 500, 1: 500}
    assert not idx["path"].str.contains("Thumbs").any()
    assert not idx["path"].str.startswith("cell_images/cell_images/").any()
    is_parasitized = labelled["path"].str.split("/").str[-2] == "Parasitized"
    assert (labelled["label"] == is_parasitized.astype(int)).all()
    assert cell_prepared.images.shape == (len(idx), cell_prepared.img_size, cell_prepared.img_size, 3)


def test_public_layout_holdout(cell_prepared: Prepared) -> None:
    idx = cell_prepared.index
    train, test, hidden = (idx[idx["split"] == s] for s in ("train", "test", "hidden"))
    assert abs(len(test) / 1000 - 0.15) < 0.04, len(test)
    assert not set(train["group"]) & set(test["group"]), "a slide is in both train and test"
    assert abs(test["label"].mean() - 0.5) < 0.08
    # No hidden set in this layout: the held-out test set stands in for it, unlabelled.
    assert sorted(hidden["img_name"]) == sorted(test["img_name"])
    assert hidden["label"].isna().all()
    sub = pd.read_csv(cell_prepared.out / "sample_submission.csv")
    assert sorted(sub["img_name"]) == sorted(hidden["img_name"])
    # Hidden rows are cached with the same pixels as their test rows.
    t = test.set_index("img_name").index.get_indexer(hidden["img_name"])
    assert np.array_equal(cell_prepared.images[hidden.index], cell_prepared.images[test.index[t]])


def test_public_layout_holdout_follows_param(shared_data: Path, tmp_path: Path, download_prepare) -> None:
    # Only the 16 originals: cheap enough to prepare twice.
    a = download_prepare(shared_data / "originals", tmp_path / "a", holdout=0.5)
    b = download_prepare(shared_data / "originals", tmp_path / "b", holdout=0.15)
    assert (a.index["split"] == "test").sum() > (b.index["split"] == "test").sum()


def test_originals_keep_native_sizes(shared_data: Path, tmp_path: Path, download_prepare) -> None:
    src = shared_data / "originals"
    p = download_prepare(src, tmp_path)
    idx = p.index
    labelled = idx[idx["split"].isin(["train", "test"])]
    assert len(labelled) == 16 and labelled["img_name"].is_unique
    native = {}
    for f in src.rglob("*.png"):
        with Image.open(f) as im:
            native[f.name] = im.size
    assert len(native) == 16
    assert {n: (w, h) for n, w, h in labelled[["img_name", "width", "height"]].itertuples(index=False)} == native
    assert native["C68P29N_ThinF_IMG_20150819_134625_cell_64.png"] == (265, 346)
    assert labelled["width"].nunique() > 5 and labelled["height"].nunique() > 5
    assert (labelled["width"] != labelled["height"]).any()
    assert labelled["width"].between(100, 400).all() and labelled["height"].between(100, 400).all()
    # The cache is square whatever the native size, and holds each image.
    assert p.images.shape == (len(idx), p.img_size, p.img_size, 3)
    for i in labelled.index[:4]:
        assert np.array_equal(p.images[i], expected_pixels(p.raw / idx["path"].iat[i], p.img_size))
    # The shared folder is copied, never modified.
    assert len(list(src.rglob("*"))) == 18


# ---------------------------------------------------------------------------------------------------------------------
# Image modes, junk files and a clean synthetic run
# ---------------------------------------------------------------------------------------------------------------------

def test_non_rgb_pngs_become_rgb(make_competition, tmp_path: Path) -> None:
    raw = make_competition()
    names = labels(raw)["img_name"].tolist()
    modes = {"RGBA": names[0], "L": names[1], "P": names[2], "LA": names[3]}
    for mode, name in modes.items():
        path = raw / "train" / name
        with Image.open(path) as im:
            im = im.convert(mode)
            if mode == "RGBA":
                im.putalpha(Image.linear_gradient("L").resize(im.size))
        im.save(path)
        with Image.open(path) as check:
            assert check.mode == mode  # the file on disk really is in that mode
    df = run_prepare(raw, tmp_path)
    images = np.load(tmp_path / "prepared" / "images.npy")
    assert images.shape == (len(df), SMALL, SMALL, 3) and images.dtype == np.uint8
    for mode, name in modes.items():
        i = df.index[df["img_name"] == name][0]
        assert np.array_equal(images[i], expected_pixels(raw / "train" / name, SMALL)), mode
        if mode in ("L", "LA"):
            assert (images[i][..., 0] == images[i][..., 1]).all() and (images[i][..., 1] == images[i][..., 2]).all()
        assert images[i].max() > 0


def test_clean_synthetic_run(make_competition, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    raw = make_competition()
    df = run_prepare(raw, tmp_path)
    assert df["split"].value_counts().to_dict() == {"train": 12, "test": 6, "hidden": 6}
    assert warnings_text(caplog) == ""
    idx = pd.read_csv(tmp_path / "prepared" / "index.csv")
    assert idx["width"].between(24, 40).all() and idx["width"].nunique() > 1


def test_junk_files_in_image_folders_are_ignored(make_competition, tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    raw = make_competition()
    for folder in ("train", "test", "hidden_test"):
        first = sorted((raw / folder).iterdir())[0]
        (raw / folder / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0" + bytes(508))
        (raw / folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(100))
        (raw / folder / "README.txt").write_text("cells from the NIH\n")
        (raw / folder / f"._{first.name}").write_bytes(b"\x00\x05\x16\x07 AppleDouble resource fork")
    df = run_prepare(raw, tmp_path)
    assert df["split"].value_counts().to_dict() == {"train": 12, "test": 6, "hidden": 6}
    assert not df["img_name"].str.startswith("._").any()
    assert warnings_text(caplog) == ""


# ---------------------------------------------------------------------------------------------------------------------
# Undecodable images
# ---------------------------------------------------------------------------------------------------------------------

def corrupt(path: Path, how: str = "random") -> None:
    if how == "random":
        path.write_bytes(np.random.default_rng(0).bytes(500))
    else:  # a real PNG cut short, as an interrupted download leaves it
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("how", ["random", "truncated"])
def test_corrupt_png_in_train(make_competition, tmp_path: Path, how: str) -> None:
    raw = make_competition()
    name = labels(raw)["img_name"].iat[3]
    corrupt(raw / "train" / name, how)
    with pytest.raises(PipelineError, match=msg("1 image files cannot be decoded", f"{name} (train)")):
        run_prepare(raw, tmp_path)
    assert not (tmp_path / "prepared" / "images.npy").exists()


def test_corrupt_png_in_hidden(make_competition, tmp_path: Path) -> None:
    raw = make_competition()
    name = labels(raw, "sample_submission.csv")["img_name"].iat[0]
    corrupt(raw / "hidden_test" / name)
    with pytest.raises(PipelineError, match=msg(f"hidden_test/{name} (hidden)")):
        run_prepare(raw, tmp_path)


def test_two_corrupt_pngs_are_both_named(make_competition, tmp_path: Path) -> None:
    raw = make_competition()
    a = labels(raw)["img_name"].iat[0]
    b = labels(raw, "test_labels.csv")["img_name"].iat[-1]
    corrupt(raw / "train" / a)
    corrupt(raw / "test" / b, "truncated")
    with pytest.raises(PipelineError, match=msg("2 image files", f"{a} (train)", f"{b} (test)")):
        run_prepare(raw, tmp_path)


# ---------------------------------------------------------------------------------------------------------------------
# Broken label files
# ---------------------------------------------------------------------------------------------------------------------

def test_labels_csv_with_wrong_columns(make_competition, tmp_path: Path) -> None:
    raw = make_competition()
    write_labels(raw, labels(raw).rename(columns={"img_name": "image", "label": "target"}))
    with pytest.raises(PipelineError, match=msg(raw / "train_labels.csv", "image,target")):
        run_prepare(raw, tmp_path)


@pytest.mark.parametrize("csv", ["train_labels.csv", "test_labels.csv"])
@pytest.mark.parametrize("value", ["2", "-1", "x", ""])
def test_bad_label_value_names_the_line(make_competition, tmp_path: Path, csv: str, value: str) -> None:
    raw = make_competition()
    df = labels(raw, csv)
    df.loc[2, "label"] = value  # the third data row: line 4 of the file
    write_labels(raw, df, csv)
    # Only that line is reported (one typo must not flag every row).
    with pytest.raises(PipelineError, match=msg(raw / csv, "0 or 1", "lines 4.")):
        run_prepare(raw, tmp_path)


def test_listed_image_missing_from_folder(make_competition, tmp_path: Path) -> None:
    raw = make_competition()
    name = labels(raw)["img_name"].iat[5]
    (raw / "train" / name).unlink()
    with pytest.raises(PipelineError, match=msg(raw / "train_labels.csv", name, "not in")):
        run_prepare(raw, tmp_path)


def test_image_without_label_row(make_competition, tmp_path: Path) -> None:
    raw = make_competition()
    df = labels(raw)
    name = df["img_name"].iat[7]
    write_labels(raw, df.drop(index=7))
    with pytest.raises(PipelineError, match=msg(name, "no row in", "train_labels.csv")):
        run_prepare(raw, tmp_path)


def test_duplicate_names_in_csv(make_competition, tmp_path: Path) -> None:
    raw = make_competition()
    df = labels(raw)
    write_labels(raw, pd.concat([df, df.iloc[[1]]], ignore_index=True))  # line 3 again, as line 14
    with pytest.raises(PipelineError, match=msg(raw / "train_labels.csv", "duplicate", "lines 3, 14")):
        run_prepare(raw, tmp_path)


@pytest.mark.parametrize("csv, split, value, missing", [("train_labels.csv", "train", "0", 1),
                                                         ("test_labels.csv", "test", "1", 0)])
def test_split_without_a_class(make_competition, tmp_path: Path, csv: str, split: str, value: str,
                               missing: int) -> None:
    raw = make_competition()
    write_labels(raw, labels(raw, csv).assign(label=value), csv)
    with pytest.raises(PipelineError, match=msg(f"{split} split", f"class {missing}")):
        run_prepare(raw, tmp_path)


def test_sample_submission_names_an_absent_image(make_competition, tmp_path: Path) -> None:
    raw = make_competition()
    df = labels(raw, "sample_submission.csv")
    ghost = "C999P999ThinF_IMG_20150101_000000_cell_1.png"
    write_labels(raw, pd.concat([df, pd.DataFrame({"img_name": [ghost], "label": ["0"]})]), "sample_submission.csv")
    with pytest.raises(PipelineError, match=msg(raw / "sample_submission.csv", ghost, "hidden_test")):
        run_prepare(raw, tmp_path)


def test_missing_labels_csv(make_competition, tmp_path: Path) -> None:
    raw = make_competition()
    (raw / "test_labels.csv").unlink()
    with pytest.raises(PipelineError, match=msg("test_labels.csv is missing")):
        run_prepare(raw, tmp_path)


# ---------------------------------------------------------------------------------------------------------------------
# Duplicated content (warnings, not errors)
# ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("folder, csv, split", [("test", "test_labels.csv", "test"),
                                                ("hidden_test", "sample_submission.csv", "hidden")])
def test_leakage_between_train_and_other_split_warns(make_competition, tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture, folder: str, csv: str,
                                                     split: str) -> None:
    raw = make_competition()
    train = labels(raw)["img_name"].tolist()
    others = labels(raw, csv)["img_name"].tolist()
    shutil.copyfile(raw / "train" / train[0], raw / folder / others[1])
    shutil.copyfile(raw / "train" / train[4], raw / folder / others[2])
    with caplog.at_level(logging.WARNING):
        run_prepare(raw, tmp_path)  # a warning, not an error
    text = warnings_text(caplog)
    assert f"2 {split} images are identical to train images" in text
    assert others[1] in text and others[2] in text
    assert "share their content" not in text


def test_duplicates_inside_train_are_reported(make_competition, tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    raw = make_competition()
    df = labels(raw)
    a, b = df["img_name"].iat[0], df["img_name"].iat[1]
    shutil.copyfile(raw / "train" / a, raw / "train" / b)
    with caplog.at_level(logging.WARNING):
        run_prepare(raw, tmp_path)
    text = warnings_text(caplog)
    assert "2 train images share their content" in text
    assert a in text and b in text
    assert "identical to train images" not in text


# ---------------------------------------------------------------------------------------------------------------------
# Layout and source problems
# ---------------------------------------------------------------------------------------------------------------------

def test_folder_with_neither_layout(make_competition, tmp_path: Path) -> None:
    raw = tmp_path / "odd"
    shutil.copytree(make_competition() / "train", raw / "images")
    with pytest.raises(PipelineError, match=msg(raw, "train_labels.csv", "Parasitized")):
        run_prepare(raw, tmp_path)


def test_empty_raw_folder(tmp_path: Path) -> None:
    raw = tmp_path / "empty"
    raw.mkdir()
    with pytest.raises(PipelineError, match=msg(raw)):
        run_prepare(raw, tmp_path)


def test_unknown_source(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match=msg("'kagle'", "kaggle, local, synthetic")):
        download(tmp_path / "out", source="kagle", path="", competition="", dataset="", synthetic={}, seed=0)


def test_local_source_with_empty_path(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match=msg("data.path", "empty")):
        download(tmp_path / "out", source="local", path="", competition="", dataset="", synthetic={}, seed=0)


def test_local_source_with_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "nndl-hw2.zip"
    with pytest.raises(PipelineError, match=msg("data.path", missing, "does not exist")):
        download(tmp_path / "out", source="local", path=str(missing), competition="", dataset="", synthetic={},
                 seed=0)


def test_local_source_not_a_zip(tmp_path: Path) -> None:
    fake = tmp_path / "nndl-hw2.zip"
    fake.write_bytes(b"<html>Please sign in to Kaggle</html>")
    with pytest.raises(PipelineError, match=msg(fake, "not a valid zip")):
        download(tmp_path / "out", source="local", path=str(fake), competition="", dataset="", synthetic={}, seed=0)


def test_zip_member_escaping_the_folder_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "evil.zip"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("train_labels.csv", "img_name,label\n")
        zf.writestr("../escaped.txt", "owned")
    with pytest.raises(PipelineError, match=msg(bad, "../escaped.txt", "escapes")):
        download(tmp_path / "work" / "out", source="local", path=str(bad), competition="", dataset="",
                 synthetic={}, seed=0)
    assert not (tmp_path / "work" / "escaped.txt").exists()


def zip_folder(folder: Path, dest: Path, arc_root: str) -> None:
    with zipfile.ZipFile(dest, "w") as zf:
        for f in sorted(folder.rglob("*")):
            zf.write(f, f"{arc_root}/{f.relative_to(folder)}")


def build_nested_bundle(raw: Path, dest: Path, kind: str) -> Path:
    """The competition's download: train.zip, test.zip, hidden_test.zip and the CSVs, in one zip or folder."""
    inner = dest / "inner"
    inner.mkdir(parents=True)
    for folder in ("train", "test", "hidden_test"):
        zip_folder(raw / folder, inner / f"{folder}.zip", folder)
    for csv in ("train_labels.csv", "test_labels.csv", "sample_submission.csv"):
        shutil.copy(raw / csv, inner / csv)
    if kind == "folder":
        return inner
    bundle = dest / "bundle.zip"
    top = "nndl-hw2/" if kind == "zip-with-top-folder" else ""
    with zipfile.ZipFile(bundle, "w") as zf:
        for f in sorted(inner.iterdir()):
            zf.write(f, top + f.name)
        zf.writestr("__MACOSX/._train.zip", b"\x00\x05\x16\x07")  # a macOS resource fork, skipped
    return bundle


@pytest.mark.parametrize("kind", ["zip", "zip-with-top-folder", "folder"])
def test_nested_zips_are_unpacked(make_competition, tmp_path: Path, kind: str) -> None:
    src = build_nested_bundle(make_competition(), tmp_path / "bundle", kind)
    out = tmp_path / "downloaded"
    out.mkdir()
    (out / "stale.png").write_bytes(b"left over from an earlier run")
    download(out, source="local", path=str(src), competition="", dataset="", synthetic={}, seed=0)
    assert not list(out.rglob("*.zip")), "zips left packed"
    assert not (out / "stale.png").exists(), "the output folder is not emptied first"
    assert not (out / "__MACOSX").exists()
    root = out / "nndl-hw2" if kind == "zip-with-top-folder" else out
    for folder, n in (("train", 12), ("test", 6), ("hidden_test", 6)):
        assert len(list((root / folder).glob("*.png"))) == n
    assert src.exists()  # a local source folder is copied, not consumed
    df = run_prepare(out, tmp_path)
    assert df["split"].value_counts().to_dict() == {"train": 12, "test": 6, "hidden": 6}
