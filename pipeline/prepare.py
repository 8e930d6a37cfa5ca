"""Stage `prepare`: validate the raw data, index every image and decode it once into a uint8 array cache."""
from __future__ import annotations

import argparse
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold
from tqdm import tqdm

from pipeline.lib.common import PipelineError, is_image_file, run_main, slide_group, written_whole
from pipeline.lib.images import decode
from pipeline.lib.params import load_params

log = logging.getLogger(__name__)

# The competition bundle: split -> (image folder, labels CSV); hidden labels are withheld.
COMPETITION = {"train": ("train", "train_labels.csv"), "test": ("test", "test_labels.csv"),
               "hidden": ("hidden_test", "sample_submission.csv")}
PUBLIC_CLASSES = {"Parasitized": 1, "Uninfected": 0}


def image_files(folder: Path) -> dict[str, Path]:
    """Images under a folder by name; Thumbs.db, .DS_Store and other non-images are ignored."""
    return {p.name: p for p in sorted(folder.rglob("*")) if p.is_file() and is_image_file(p)}


def find_dir(root: Path, name: str) -> Path | None:
    """The folder called `name` holding the most images (Kaggle sometimes nests train/train/)."""
    candidates = [d for d in [root / name, *root.rglob(name)] if d.is_dir()]
    return max(candidates, key=lambda d: len(image_files(d)), default=None)


def read_labels(csv: Path, *, hidden: bool) -> pd.DataFrame:
    """Read an `img_name,label` CSV, failing with the file and rows on any problem."""
    try:
        df = pd.read_csv(csv, dtype={"img_name": str}, encoding="utf-8-sig")  # Excel writes a BOM
    except Exception as e:
        raise PipelineError(f"{csv}: cannot be read as CSV ({e}).") from None
    if not {"img_name", "label"} <= set(df.columns):
        raise PipelineError(f"{csv}: expected columns img_name,label but found {','.join(map(str, df.columns))}.")
    rows = lambda mask: ", ".join(str(i + 2) for i in np.flatnonzero(mask)[:10])  # 1-based, after the header
    empty = df["img_name"].isna() | (df["img_name"].str.strip() == "")
    if empty.any():
        raise PipelineError(f"{csv}: empty img_name at lines {rows(empty)}; every row must name its image file.")
    dup = df["img_name"].duplicated(keep=False)
    if dup.any():
        raise PipelineError(f"{csv}: duplicate img_name at lines {rows(dup)}; each image must be listed once.")
    if not hidden:
        label = pd.to_numeric(df["label"], errors="coerce")  # one typo must not make every "0" a string
        bad = ~label.isin([0, 1])
        if bad.any():
            raise PipelineError(f"{csv}: labels must be 0 or 1; bad values at lines {rows(bad)}.")
        df["label"] = label.astype(int)
    return df[["img_name", "label"]]


def match(split: str, labels: pd.DataFrame, files: dict[str, Path], csv: Path, folder: Path) -> pd.DataFrame:
    """Join a labels table to the files on disk; every listed image must exist and every image be listed."""
    missing = sorted(set(labels["img_name"]) - set(files))
    unlisted = sorted(set(files) - set(labels["img_name"]))
    if missing:
        raise PipelineError(f"{csv}: {len(missing)} listed {split} images are not in {folder}: "
                            f"{', '.join(missing[:10])}. Re-download the data or fix the CSV.")
    if unlisted:
        raise PipelineError(f"{folder}: {len(unlisted)} {split} images have no row in {csv}: "
                            f"{', '.join(unlisted[:10])}. Add their labels or remove them.")
    df = labels.assign(split=split, path=labels["img_name"].map(files))
    if split == "hidden":
        df["label"] = np.nan
    return df


def scan_competition(root: Path) -> pd.DataFrame:
    parts = []
    for split, (folder_name, csv_name) in COMPETITION.items():
        csv = root / csv_name
        folder = find_dir(root, folder_name)
        if not csv.is_file() and folder is None and split != "train":
            continue  # no labelled test or no hidden set: prepare() holds one out
        if not csv.is_file():
            raise PipelineError(f"{csv} is missing, but the {split} images need it.")
        if folder is None:
            raise PipelineError(f"{root}: no folder {folder_name}/ with images for {csv_name}.")
        parts.append(match(split, read_labels(csv, hidden=split == "hidden"), image_files(folder), csv, folder))
    return pd.concat(parts, ignore_index=True)


def scan_public(root: Path) -> pd.DataFrame:
    """cell_images/{Parasitized,Uninfected}/, keeping one copy of each name (the archive nests a duplicate)."""
    rows = {}
    for cls, label in PUBLIC_CLASSES.items():
        # Shallowest folder first, so the duplicate cell_images/cell_images/ copy is the one dropped.
        for folder in sorted((d for d in root.rglob(cls) if d.is_dir()), key=lambda d: len(d.parts)):
            for name, path in image_files(folder).items():
                if name in rows and rows[name]["label"] != label:
                    raise PipelineError(f"{name} is both in {rows[name]['path'].parent} and {folder}.")
                rows.setdefault(name, {"img_name": name, "label": label, "split": "train", "path": path})
    return pd.DataFrame(list(rows.values()))


def decode_all(df: pd.DataFrame, size: int, workers: int = 4) -> np.ndarray:
    """Decode every image once (Pillow releases the GIL, so threads help); fail naming every bad file."""
    cache = np.zeros((len(df), size, size, 3), np.uint8)
    meta, bad = [], []

    def one(i):
        try:
            return i, decode(df["path"].iat[i], size), None
        except Exception as e:  # NotAnImage says what it is; Pillow raises many kinds for a damaged file
            what = str(e) if isinstance(e, PipelineError) else f"{type(e).__name__}: {e}"
            return i, None, f"{df['path'].iat[i]} ({df['split'].iat[i]}): {what}"

    with ThreadPoolExecutor(workers) as pool:
        for i, out, err in tqdm(pool.map(one, range(len(df))), total=len(df), desc="decode", unit="img"):
            if err:
                bad.append(err)
                continue
            cache[i] = out[0]
            meta.append((i, *out[1:]))
    if bad:
        raise PipelineError(f"{len(bad)} image files cannot be decoded; replace or remove them:\n  " + "\n  ".join(bad))
    m = pd.DataFrame(meta, columns=["i", "width", "height", "hash"]).set_index("i").sort_index()
    df["width"], df["height"], df["hash"] = m["width"].astype(int), m["height"].astype(int), m["hash"]
    return cache


def holdout(df: pd.DataFrame, fraction: float, seed: int) -> pd.DataFrame:
    """Move a stratified, patient-grouped fraction of train to test (for data with no labelled test set)."""
    if not 0 < fraction < 1:
        raise PipelineError(f"data.holdout is {fraction}; it must be between 0 and 1 to hold out a test set.")
    n_splits = max(2, round(1 / fraction))
    train = df.index[df["split"] == "train"]
    sgkf = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    _, test = next(sgkf.split(train, df.loc[train, "label"], df.loc[train, "group"]))
    df.loc[train[test], "split"] = "test"
    log.info("No labelled test set: held out %d of %d images (%d slides)", len(test), len(train),
             df.loc[train[test], "group"].nunique())
    return df


def add_test_to_train(df: pd.DataFrame) -> pd.DataFrame:
    """The final fit (data.train_on_test): every labelled test image also becomes a train row; the test rows stay,
    so the pipeline still runs and reports (its test scores are then marked seen)."""
    test = df[df["split"] == "test"]
    clash = sorted(set(test["img_name"]) & set(df.loc[df["split"] == "train", "img_name"]))
    if clash:
        raise PipelineError(f"data.train_on_test: {len(clash)} test images share their name with a train image "
                            f"(e.g. {', '.join(clash[:4])}); rename them or set data.train_on_test: false.")
    log.info("data.train_on_test: the %d labelled test images join training on purpose (the final fit); every test "
             "score is marked as seen in training", len(test))
    return pd.concat([df, test.assign(split="train")], ignore_index=True)


def check(df: pd.DataFrame) -> None:
    """Fail on an empty class; warn about duplicated content (leakage between train and test/hidden)."""
    for split in ("train", "test"):
        counts = df.loc[df["split"] == split, "label"].value_counts()
        for label in (0, 1):
            if counts.get(label, 0) == 0:
                raise PipelineError(f"The {split} split has no images of class {label}; both classes are needed.")
    # Test images that joined training on purpose (data.train_on_test) are not leakage: compare with the rest.
    test_names = set(df.loc[df["split"] == "test", "img_name"])
    train = df[(df["split"] == "train") & ~df["img_name"].isin(test_names)]
    dup = train[train["hash"].duplicated(keep=False)]
    if len(dup):
        conflict = dup.groupby("hash")["label"].nunique().gt(1).sum()
        log.warning("%d train images share their content with another train image (%d sets, %d with conflicting "
                    "labels), e.g. %s", len(dup), dup["hash"].nunique(), conflict, ", ".join(dup["img_name"][:4]))
    for split in ("test", "hidden"):
        other = df[(df["split"] == split) & df["hash"].isin(train["hash"])]
        if len(other):
            log.warning("Leakage: %d %s images are identical to train images, e.g. %s", len(other), split,
                        ", ".join(other["img_name"][:4]))


def prepare(raw: Path, out: Path, *, img_size: int, holdout_fraction: float, seed: int,
            train_on_test: bool = False) -> pd.DataFrame:
    if (root := next(iter(sorted(raw.rglob("train_labels.csv"), key=lambda p: len(p.parts))), None)) is not None:
        log.info("Competition layout in %s", root.parent)
        df = scan_competition(root.parent)
    elif any(d.is_dir() for d in raw.rglob("Parasitized")):
        log.info("Public cell_images layout in %s", raw)
        df = scan_public(raw)
    else:
        raise PipelineError(f"{raw}: found neither train_labels.csv (competition layout) nor "
                            "Parasitized/ and Uninfected/ folders (public layout). Check data.source and data.path.")
    if df.empty or (df["split"] == "train").sum() == 0:
        raise PipelineError(f"{raw}: no training images found.")
    df["group"] = df["img_name"].map(slide_group)
    if not (df["split"] == "test").any():
        df = holdout(df, holdout_fraction, seed)
    if not (df["split"] == "hidden").any():
        # Nothing to predict for Kaggle: predict the held-out test set, as a stand-in hidden set.
        df = pd.concat([df, df[df["split"] == "test"].assign(split="hidden", label=np.nan)], ignore_index=True)
    if train_on_test:
        df = add_test_to_train(df)
    order = {"train": 0, "test": 1, "hidden": 2}
    df = df.sort_values(["split", "img_name"], key=lambda s: s.map(order) if s.name == "split" else s)
    df = df.reset_index(drop=True)
    cache = decode_all(df, img_size)
    check(df)
    df["path"] = df["path"].map(lambda p: str(Path(p).relative_to(raw)))
    df["label"] = df["label"].astype("Int64")
    sample = root.parent / "sample_submission.csv" if root is not None else None
    sub = pd.read_csv(sample) if sample is not None and sample.is_file() else \
        df.loc[df["split"] == "hidden", ["img_name"]].assign(label=0)
    # The folder whole or not at all: a killed or disk-full run never leaves a cache (or a cache and an index of
    # different runs) that the next run trusts.
    out.parent.mkdir(parents=True, exist_ok=True)
    with written_whole(out, cache.nbytes) as tmp:
        tmp.mkdir()
        np.save(tmp / "images.npy", cache)
        df[["split", "img_name", "label", "group", "width", "height", "hash", "path"]].to_csv(tmp / "index.csv",
                                                                                            index=False)
        sub.to_csv(tmp / "sample_submission.csv", index=False)
    for split, part in df.groupby("split", sort=False):
        log.info("%-6s %5d images, %4d slides, positive rate %s", split, len(part), part["group"].nunique(),
                 f"{part['label'].mean():.3f}" if part["label"].notna().any() else "n/a")
    return df


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--raw", required=True, help="the download stage's folder")
    parser.add_argument("--out", required=True, help="folder for index.csv, images.npy, sample_submission.csv")
    args = parser.parse_args()
    d = load_params()["data"]
    prepare(Path(args.raw), Path(args.out), img_size=d["img_size"], holdout_fraction=d["holdout"], seed=d["seed"],
            train_on_test=d["train_on_test"])


if __name__ == "__main__":
    run_main(main)
