"""The test-time augmentation views by name: the names, the groups and their check (no numpy, no torch: the params
schema checks tta.views with it, and the stages that read params need not re-run when the views' code changes)."""
from __future__ import annotations

D4 = ["identity", "rot90", "rot180", "rot270", "hflip", "vflip", "transpose", "antitranspose"]
CROPS = ["crop_center", "crop_tl", "crop_tr", "crop_bl", "crop_br"]
# Groups: ResNet's 10-crop (five crops of the image and of its mirror) and a multi-scale set (the batch resized
# to 88 % and 112 % of the side: global pooling takes any size). `a+b` applies view a, then view b.
GROUPS = {"d4": D4, "five_crop": CROPS, "ten_crop": CROPS + [f"{c}+hflip" for c in CROPS],
          "multi_scale": ["identity", "scale_88", "scale_112"]}
SCALES = range(50, 201)  # scale_<percent> views allowed


def expand_views(views: list[str]) -> list[str]:
    """Expand groups (`d4`, `five_crop`) and check names; raises ValueError naming an unknown view."""
    out = []
    for v in views:
        for name in GROUPS.get(v, [v]):
            if not all(_known(part) for part in name.split("+")):
                raise ValueError(f"unknown TTA view {name!r} in tta.views; use {', '.join(D4 + CROPS)}, scale_<percent> "
                                 f"({SCALES.start}-{SCALES.stop - 1}), views joined by + (crop_tl+hflip), or the groups "
                                 f"{', '.join(GROUPS)}")
            if name not in out:
                out.append(name)
    return out


def _known(part: str) -> bool:
    if part.startswith("scale_"):
        return part[6:].isdigit() and int(part[6:]) in SCALES
    return part in D4 + CROPS
