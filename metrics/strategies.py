"""Emergent attack strategies from the difference map (METHOD.md, "Emergent strategies").

Each kept edit is classified as one of:
- ``perturbation``: imperceptible — many pixels moved a little, none a lot;
- ``addition``: something appears where the clean image was plain;
- ``removal``: something plain replaces what was there;
- ``replacement``: structure both before and after, but different;
- ``hybrid``: several changed regions of different kinds (or strong changes on top of a
  perturbation of the rest).
From connected components of strongly changed pixels, and for each component whether the clean
and the edited image have structure there (local standard deviation). A real judge's
description of the change can refine the label; this is the pixel-level part.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
from PIL import Image
from scipy import ndimage

STRATEGIES = ("perturbation", "addition", "removal", "replacement", "hybrid", "none")


def _structure(gray: np.ndarray, mask: np.ndarray, ring: np.ndarray) -> float:
    """How much a region stands out: std inside, plus its mean's distance from the surrounding ring."""
    inside = gray[mask]
    around = gray[ring] if ring.any() else inside
    return float(inside.std() + abs(inside.mean() - np.median(around)))


def classify_edit(
    clean: Image.Image,
    edited: Image.Image,
    strong: int = 32,
    weak: int = 2,
    structure_min: float = 12.0,
    min_area: int = 9,
    moved: int = 16,
) -> dict:
    a = np.asarray(clean.convert("RGB")).astype(np.int16)
    b = np.asarray(edited.convert("RGB")).astype(np.int16)
    if a.shape != b.shape:
        raise ValueError(f"clean and edited differ in size: {a.shape} vs {b.shape}")
    diff = np.abs(a - b).max(axis=-1)
    weak_frac = float((diff > weak).mean())
    labels, n = ndimage.label(diff > strong, structure=np.ones((3, 3)))
    ga, gb = a.mean(axis=-1), b.mean(axis=-1)
    kinds = []
    for i, sl in enumerate(ndimage.find_objects(labels), start=1):
        region = labels[sl] == i
        if region.sum() < min_area:
            continue
        mask = np.zeros(diff.shape, dtype=bool)
        mask[sl] = region
        grown = ndimage.binary_dilation(mask, iterations=3)
        ring = grown & ~mask
        # The component's bounding box is the object's extent; structure is judged there.
        box = np.zeros_like(mask)
        box[sl] = True
        before = _structure(ga, box, ring & ~box)
        after = _structure(gb, box, ring & ~box)
        if before < structure_min and after >= structure_min:
            kinds.append("addition")
        elif before >= structure_min and after < structure_min:
            kinds.append("removal")
        else:
            kinds.append("replacement")
    strong_frac = float((labels > 0).mean())
    if not kinds:  # nothing strongly changed: a perturbation if much of the image moved a little
        label = "perturbation" if weak_frac > 0.2 else "none"
    elif len(set(kinds)) == 1 and not (weak_frac - strong_frac > 0.2):
        label = kinds[0]
    else:
        label = "hybrid"
    return {
        "strategy": label,
        "regions": kinds,
        "changed_fraction": weak_frac,
        # pixels moved by more than ``moved`` levels: a small editor's rough copy of the scene moves
        # most pixels a few levels (changed_fraction ~1), a scene washed out by the edit most by more
        "moved_fraction": float((diff > moved).mean()),
        "strong_fraction": strong_frac,
        "max_diff": int(diff.max()),
    }


def strategy_mix(labels: list[str]) -> dict[str, float]:
    """Fraction of each strategy among kept edits (every strategy listed, zeros included)."""
    counts = Counter(labels)
    n = max(1, len(labels))
    return {s: counts.get(s, 0) / n for s in STRATEGIES}


# Words of a judge's description that name one strategy (matched at the start of a word).
DESCRIPTION_WORDS = {
    "addition": ("add", "insert", "new", "appear", "place"),
    "removal": ("remov", "erase", "delet", "gone", "disappear"),
    "replacement": ("replac", "swap", "substitut", "turned into", "changed into"),
    "perturbation": ("noise", "subtle", "slight", "no visible", "imperceptible"),
}


def refine_with_description(label: str, description: str | None) -> str:
    """The pixel-level label, refined by a judge's description of the change: when the pixels
    are ambiguous (``hybrid`` or ``none``) and the description names exactly one strategy, that
    strategy; a clear pixel-level label is kept (the description can be wrong)."""
    if not description or label not in ("hybrid", "none"):
        return label
    import re

    text = description.lower()
    named = [k for k, words in DESCRIPTION_WORDS.items() if any(re.search(rf"\b{re.escape(w)}", text) for w in words)]
    return named[0] if len(named) == 1 else label
