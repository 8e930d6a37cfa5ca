"""Generate a deterministic synthetic Giemsa-stained thin-smear cell dataset in the competition layout."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

logger = logging.getLogger(__name__)

# Approximate Giemsa colours (RGB): pale salmon cytoplasm, dark purple chromatin,
# lilac platelets and a dull mauve for stain smudges.
CELL_RGB = np.array([218.0, 165.0, 160.0])
PARASITE_RGB = np.array([95.0, 40.0, 125.0])
PLATELET_RGB = np.array([185.0, 150.0, 205.0])
SMUDGE_RGB = np.array([165.0, 110.0, 140.0])


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [-1, 1]: a coarse random grid upsampled bilinearly."""
    grid = (rng.random((cells, cells)) * 2.0 - 1.0).astype(np.float32)
    return np.asarray(Image.fromarray(grid).resize((w, h), Image.BILINEAR))


def _blob(xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, sigma: float) -> np.ndarray:
    return np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2.0 * sigma**2))


def _paint(img: np.ndarray, alpha: np.ndarray, rgb: np.ndarray) -> None:
    """Alpha-composite a flat colour into img in place."""
    a = np.clip(alpha, 0.0, 1.0)[..., None]
    img *= 1.0 - a
    img += a * rgb


def _render_cell(rng: np.random.Generator, label: int, stain: np.ndarray, min_size: int, max_size: int) -> Image.Image:
    """Render one segmented cell crop; `stain` is the slide's per-channel colour gain."""
    h, w = (int(v) for v in rng.integers(min_size, max_size + 1, size=2))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    cx = w / 2.0 + rng.uniform(-0.03, 0.03) * w
    cy = h / 2.0 + rng.uniform(-0.03, 0.03) * h
    # Shape: unit ellipse (semi-axes 1 and ecc) rotated by theta, then stretched so its bounding
    # box fills 70-95% of the crop per axis, since real crops are tight boxes around the cell.
    ecc, theta = rng.uniform(0.7, 1.0), rng.uniform(0.0, np.pi)
    cos, sin = np.cos(theta), np.sin(theta)
    sx = w / 2.0 * rng.uniform(0.70, 0.95) / np.hypot(cos, ecc * sin)  # pixels per unit along x
    sy = h / 2.0 * rng.uniform(0.70, 0.95) / np.hypot(sin, ecc * cos)
    gx, gy = (xx - cx) / sx, (yy - cy) / sy
    u, v = gx * cos + gy * sin, (gy * cos - gx * sin) / ecc
    rnorm, phi = np.hypot(u, v), np.arctan2(v, u)
    # Wobbly boundary: a few low harmonics perturb the radius so the outline is not a perfect
    # ellipse; normalising by the max keeps the cell inside its box.
    wobble = np.ones_like(phi)
    for k in range(2, 6):
        wobble += rng.uniform(0.0, 0.035) * np.cos(k * phi + rng.uniform(0.0, 2 * np.pi))
    wobble /= wobble.max()
    d = rnorm / wobble  # < 1 inside the cell
    inside = d < 1.0

    # Stain colour: slide gain times per-image brightness/hue jitter.
    gain = stain * rng.uniform(0.88, 1.08) * (1.0 + rng.normal(0.0, 0.03, size=3))
    img = np.broadcast_to(CELL_RGB * gain, (h, w, 3)).copy()
    # Slightly darker rim and paler centre (biconcave disc), then mottled texture and grain.
    shade = 1.0 - rng.uniform(0.05, 0.14) * np.clip((d - 0.6) / 0.4, 0.0, 1.0) ** 2
    shade += rng.uniform(0.0, 0.05) * np.exp(-(d**2) / 0.08)
    shade += 0.04 * _smooth_noise(rng, h, w, 6)
    img *= shade[..., None]
    img += rng.normal(0.0, 3.0, size=(h, w, 3))

    scale = min(h, w) / 100.0  # parasites and distractors scale mildly with cell size

    def to_px(rr: float, aa: float) -> tuple[float, float]:
        # Point at normalised radius rr and angle aa in cell coordinates -> pixel coordinates.
        pu, pv = rr * np.cos(aa), rr * ecc * np.sin(aa)
        return cx + (pu * cos - pv * sin) * sx, cy + (pu * sin + pv * cos) * sy

    def inner_point(max_d: float) -> tuple[float, float]:
        # Uniform point inside the cell at normalised radius <= max_d.
        return to_px(max_d * np.sqrt(rng.random()), rng.uniform(0.0, 2 * np.pi))

    # Distractors mostly on uninfected cells, sometimes on parasitized ones too, so their
    # presence alone is not a label cue.
    if rng.random() < (0.35 if label == 0 else 0.12):
        # Platelet: a pale lilac blob straddling the cell edge.
        px, py = to_px(0.95, rng.uniform(0.0, 2 * np.pi))
        _paint(img, rng.uniform(0.5, 0.85) * _blob(xx, yy, px, py, rng.uniform(3.0, 6.0) * scale), PLATELET_RGB)
    if rng.random() < (0.30 if label == 0 else 0.10):
        # Stain smudge: larger and more diffuse than any parasite, moderately dark.
        px, py = inner_point(0.7)
        _paint(img, rng.uniform(0.2, 0.45) * _blob(xx, yy, px, py, rng.uniform(4.0, 9.0) * scale), SMUDGE_RGB)

    if label == 1:
        faint_single = rng.random() < 0.2  # hard positives: one small, faint dot only
        n_par = 1 if faint_single else int(rng.integers(1, 4))
        for _ in range(n_par):
            px, py = inner_point(0.75)
            if faint_single:
                alpha = rng.uniform(0.2, 0.5) * _blob(xx, yy, px, py, rng.uniform(1.2, 2.0) * scale)
            elif rng.random() < 0.5:
                # Chromatin dot of varying size and contrast.
                alpha = rng.uniform(0.5, 0.95) * _blob(xx, yy, px, py, rng.uniform(1.8, 3.5) * scale)
            else:
                # Ring-form trophozoite: thin purple annulus with a chromatin dot on it.
                r0, t = rng.uniform(3.0, 5.5) * scale, rng.uniform(0.8, 1.3) * scale
                dist = np.sqrt((xx - px) ** 2 + (yy - py) ** 2)
                alpha = rng.uniform(0.45, 0.85) * np.exp(-((dist - r0) ** 2) / (2.0 * t**2))
                ang = rng.uniform(0.0, 2 * np.pi)
                dot = _blob(xx, yy, px + r0 * np.cos(ang), py + r0 * np.sin(ang), rng.uniform(1.2, 2.0) * scale)
                alpha = np.maximum(alpha, rng.uniform(0.6, 0.95) * dot)
            _paint(img, alpha, PARASITE_RGB)

    # Real crops are segmented cells on a pure black background.
    img[~inside] = 0.0
    pil = Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8))
    return pil.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.5, 0.9))))


def _write_csv(path: Path, rows: list[tuple[str, int]]) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["img_name", "label"])
        writer.writerows(sorted(rows))


def make_synthetic(
    out_dir: Path,
    *,
    n_train: int,
    n_test: int,
    n_hidden: int,
    seed: int,
    n_slides: int = 60,
    min_size: int = 56,
    max_size: int = 144,
) -> None:
    """Write train/, test/, hidden_test/ PNGs plus train_labels.csv, test_labels.csv, sample_submission.csv."""
    for name, n in (("n_train", n_train), ("n_test", n_test), ("n_hidden", n_hidden)):
        if n < 2:
            raise ValueError(f"{name} must be >= 2, got {n}")
    if n_slides < 1:
        raise ValueError(f"n_slides must be >= 1, got {n_slides}")
    if not 8 <= min_size <= max_size:
        raise ValueError(f"need 8 <= min_size <= max_size, got min_size={min_size}, max_size={max_size}")

    rng = np.random.default_rng(seed)
    out_dir = Path(out_dir)

    # Slides: patient prefix, parasitized rate, stain gain and a few capture timestamps each.
    slides = []
    for i in range(n_slides):
        n_imgs = int(rng.integers(3, 7))
        month, day = int(rng.integers(6, 10)), int(rng.integers(1, 29))
        seconds = rng.choice(9 * 3600, size=n_imgs, replace=False) + 8 * 3600  # distinct times during a workday
        stamps = [f"2015{month:02d}{day:02d}_{s // 3600:02d}{s // 60 % 60:02d}{s % 60:02d}" for s in seconds]
        slides.append({
            "prefix": f"C{100 + i}P{61 + i}ThinF",
            "rate": rng.uniform(0.3, 0.7),
            "stain": 1.0 + rng.normal(0.0, 0.04, size=3),
            "stamps": stamps,
        })
    # Cell counters per (slide, timestamp) keep names unique across all splits.
    counters: dict[tuple[int, str], int] = {}

    splits = (("train", n_train), ("test", n_test), ("hidden_test", n_hidden))
    for split, n in splits:
        split_dir = out_dir / split
        split_dir.mkdir(parents=True, exist_ok=True)
        rows: list[tuple[str, int]] = []
        for _ in range(n):
            s = int(rng.integers(n_slides))  # every split samples from all slides
            slide = slides[s]
            stamp = slide["stamps"][int(rng.integers(len(slide["stamps"])))]
            if (s, stamp) not in counters:
                counters[(s, stamp)] = int(rng.integers(1, 60))  # real cell numbering rarely starts at 1
            k = counters[(s, stamp)]
            counters[(s, stamp)] = k + 1
            name = f"{slide['prefix']}_IMG_{stamp}_cell_{k}.png"
            label = int(rng.random() < slide["rate"])
            # Own generator per image: how many draws a render uses never shifts the metadata stream.
            cell_rng = np.random.default_rng(rng.integers(2**63))
            _render_cell(cell_rng, label, slide["stain"], min_size, max_size).save(split_dir / name)
            rows.append((name, label))
        if split == "hidden_test":
            _write_csv(out_dir / "sample_submission.csv", [(r[0], 0) for r in rows])
        else:
            _write_csv(out_dir / f"{split}_labels.csv", rows)
        logger.info("wrote %d %s images (%d parasitized) to %s", n, split, sum(r[1] for r in rows), split_dir)
