"""Stage 2's cheap checks on a distractor proposal, before any model paints it.

- *Box check*: the box lies inside the image, its sides are within size bounds, and it does not
  touch any target box grown by a margin (IoU = 0 plus a margin, DESIGN.md).
- *Prompt check*: the description must not refer to a target: it names a target's category and
  either names no colour or the target's own colour (then it could be read as the target, and
  the question's ground truth would become ambiguous). "blue circle" next to a target "red
  circle" passes; "circle" or "red circle" does not. A target named by category alone (counting
  questions) rejects any description of that category.
"""

from __future__ import annotations

import re

from metrics import expand_box, intersection

# Basic colour terms (Berlin & Kay) plus the synthetic world's palette; enough to tell
# "a blue cup" from "a cup" in real descriptions too.
COLOUR_WORDS = frozenset(
    "red green blue yellow purple orange black white grey gray brown pink violet cyan magenta".split()
)


def box_check(
    box: list[float],
    width: int,
    height: int,
    target_boxes: list[list[float]],
    margin: float,
    min_frac: float,
    max_frac: float,
) -> tuple[bool, str]:
    x0, y0, x1, y1 = box
    if not (x1 > x0 and y1 > y0):
        return False, f"degenerate box {box}"
    if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
        return False, f"box {box} leaves the {width}x{height} image"
    side_ref = min(width, height)
    bw, bh = x1 - x0, y1 - y0
    if min(bw, bh) < min_frac * side_ref:
        return False, f"box side {min(bw, bh):.0f}px < {min_frac:.2f} of the image side"
    if max(bw, bh) > max_frac * side_ref:
        return False, f"box side {max(bw, bh):.0f}px > {max_frac:.2f} of the image side"
    for t in target_boxes:
        if intersection(box, expand_box(t, margin)) > 0:
            return False, f"box overlaps target box {[round(v) for v in t]} (margin {margin:g}px)"
    return True, ""


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def _mentions(words: list[str], term: str) -> bool:
    """Does a word list contain ``term`` (one or more words), allowing a plural -s/-es?"""
    tw = _words(term)
    if not tw:
        return False
    n = len(tw)
    for i in range(len(words) - n + 1):
        window = words[i : i + n]
        if window[:-1] == tw[:-1] and window[-1] in (tw[-1], tw[-1] + "s", tw[-1] + "es"):
            return True
    return False


def split_name(name: str) -> tuple[str | None, str]:
    """A target's referring expression -> (colour or None, category words)."""
    words = _words(name)
    colours = [w for w in words if w in COLOUR_WORDS]
    rest = " ".join(w for w in words if w not in COLOUR_WORDS)
    return (colours[0] if colours else None), rest


def prompt_check(description: str, target_names: list[str]) -> tuple[bool, str]:
    words = _words(description)
    if not words:
        return False, "empty description"
    colours = {w for w in words if w in COLOUR_WORDS}
    for name in target_names:
        colour, category = split_name(name)
        if not category or not _mentions(words, category):
            continue
        if colour is None or not colours or colour in colours:
            return False, f"description {description!r} could refer to the target {name!r}"
    return True, ""
