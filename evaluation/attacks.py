"""Pluggable attacks: a registered callable edits one dataset row; evaluation takes any by name.

An attack is built by a factory registered under a name, ``build_attack(name, cfg, store,
**params)``, and called on a dataset row (``image``, ``question``, ``options``, ``answer``,
``target_names``, ``target_boxes``, ``scene``): it returns an ``Attacked`` (edited image, edited
scene or None, metadata) or a string saying why it could not attack this row. A new family is one
``@register_attack`` away.

Registered here:

- ``swap-pair``: for a relation question "Where is A relative to B?", two distractors that swap
  the targets' attributes (A's colour on B's category and B's colour on A's category) placed on
  the mirrored side (A's decoy beyond B, B's decoy beyond A), so a reader that binds colour or
  shape alone reads the opposite relation. No training arm ever proposes pairs or mirrored
  placement: it is the held-out family for relation questions.
- ``option-decoys``: for a colour question, other shapes in the wrong options' colours right
  beside the target: the held-out family for colour questions.
- ``backdrop-tint``: for a colour question, the background around the target tinted towards a
  wrong option's colour (a change of lighting, no object added): a second held-out family for
  colour questions, since every training arm edits by adding objects. ``backdrop-tint-outline``:
  the same tint up to the objects' outlines, without the untinted rectangle of their boxes.

The attacks that need the pipeline's own stages (Stage 2's ``implanter``, a trained
``aot-attacker`` version) register themselves in stages/attack.py, which also turns any attack
into a versioned dataset (``attack_version``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image

from storage import ShardStore, decode_image


@dataclass
class Attacked:
    image: Image.Image
    scene: dict | None
    meta: dict


AttackFn = Callable[[dict], "Attacked | str"]
ATTACKS: dict[str, Callable[..., AttackFn]] = {}


def register_attack(name: str):
    """Register ``factory(cfg, store, **params) -> AttackFn`` under ``name``."""

    def deco(factory):
        ATTACKS[name] = factory
        return factory

    return deco


def build_attack(name: str, cfg, store: ShardStore | None = None, **params) -> AttackFn:
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}: registered attacks are {', '.join(sorted(ATTACKS))}")
    return ATTACKS[name](cfg, store, **params)


def _mirror_box(box: list[float], about: list[float], size: tuple[int, int]) -> list[float]:
    """``box`` moved to the point mirrored through ``about``'s centre, kept inside the image."""
    w, h = box[2] - box[0], box[3] - box[1]
    cx = (about[0] + about[2]) - (box[0] + box[2]) / 2
    cy = (about[1] + about[3]) - (box[1] + box[3]) / 2
    x0 = min(max(0.0, cx - w / 2), size[0] - w)
    y0 = min(max(0.0, cy - h / 2), size[1] - h)
    return [x0, y0, x0 + w, y0 + h]


def _place_decoys(row: dict, decoys: list[tuple[str, str, list[float]]], margin: float, question_type: str):
    """Draw each decoy (colour, category, box) whose box keeps ``margin`` pixels from every object,
    then check exact integrity: the targets' pixels and the question's answer are unchanged.
    Returns ``Attacked`` or the reason there is none."""
    from metrics import expand_box, intersection, localized_ssim
    from world import Scene, add_object, answer_from_scene, draw_object_into

    scene = Scene.from_dict(json.loads(row["scene"]))
    clean = decode_image(row["image"])
    image = clean
    occupied = [scene.image_box(o) for o in scene.visible(1e-9)]
    placed = []
    for colour, category, box in decoys:
        if box[0] < 0 or box[1] < 0 or box[2] > image.width or box[3] > image.height:
            continue
        if any(intersection(box, expand_box(o, margin)) > 0 for o in occupied):
            continue
        image, drawn = draw_object_into(image, box, category, colour)
        add_object(scene, drawn, category, colour)
        occupied.append([float(v) for v in drawn])
        placed.append(f"{colour} {category}")
    if not placed:
        return "no free place for any decoy"
    ssim = min(localized_ssim(clean, image, b) for b in row["target_boxes"])
    if answer_from_scene(question_type, row["question"], scene, row["options"]) != row["answer"]:
        return "the decoys changed the answer"
    return Attacked(image, scene.to_dict(), {"distractors": placed, "target_ssim_min": ssim})


@register_attack("swap-pair")
def swap_pair(cfg, store=None, margin: float = 2.0, **_) -> AttackFn:
    from world import CATEGORIES, parse_expression

    def attack(row: dict):
        if row.get("question_type", "relative_position") != "relative_position" or len(row["target_boxes"]) != 2:
            return "swap-pair attacks relation questions (two targets)"
        if not row.get("scene"):
            return "swap-pair needs the row's scene (synthetic rows)"
        (ca, ka), (cb, kb) = (parse_expression(n) for n in row["target_names"])
        if ka == kb:  # swapping would recreate a target: borrow a third category instead
            kb = next(c for c in CATEGORIES if c != ka)
        size = (row["width"], row["height"])
        a, b = row["target_boxes"]
        decoys = [
            (ca, kb, _mirror_box(a, b, size)),  # A's colour, beyond B
            (cb, ka, _mirror_box(b, a, size)),
        ]  # B's colour, beyond A
        decoys = [d for d in decoys if d[0] is not None and (d[0], d[1]) not in ((ca, ka), (cb, kb))]
        return _place_decoys(row, decoys, margin, "relative_position")

    return attack


@register_attack("option-decoys")
def option_decoys(cfg, store=None, gap: float = 2.0, margin: float = 1.0, **_) -> AttackFn:
    """For a colour question "What is the colour of the K?": objects of other categories painted in
    the *wrong options'* colours, right beside the target (left, right, above, below; up to two).
    A reader that reports a colour present near the named object, rather than the object's own,
    picks a wrong option. No training arm reads the options to choose colours or places a decoy
    against the target: a held-out family for colour questions."""
    from world import CATEGORIES, parse_expression

    def attack(row: dict):
        if row.get("question_type") != "colour" or len(row["target_boxes"]) != 1:
            return "option-decoys attacks colour questions (one target)"
        if not row.get("scene"):
            return "option-decoys needs the row's scene (synthetic rows)"
        _, category = parse_expression(row["target_names"][0])
        truth = row["options"][ord(row["answer"]) - ord("A")]
        wrong = [o for o in row["options"] if o != truth]
        others = [c for c in CATEGORIES if c != category]
        x0, y0, x1, y1 = row["target_boxes"][0]
        w, h = x1 - x0, y1 - y0
        sides = [
            [x0 - gap - w, y0, x0 - gap, y1],
            [x1 + gap, y0, x1 + gap + w, y1],
            [x0, y0 - gap - h, x1, y0 - gap],
            [x0, y1 + gap, x1, y1 + gap + h],
        ]
        rng = np.random.default_rng(_row_seed(row["id"]))
        wrong = [wrong[i] for i in rng.permutation(len(wrong))]
        order = rng.permutation(len(sides))
        decoys = [(wrong[i % len(wrong)], others[i % len(others)], sides[j]) for i, j in enumerate(order)]
        out = _place_decoys(row, decoys[:2], margin, "colour")
        if isinstance(out, str) and len(decoys) > 2:  # both first sides blocked: try the other two
            out = _place_decoys(row, decoys[2:], margin, "colour")
        return out

    return attack


@register_attack("backdrop-tint")
def backdrop_tint(
    cfg, store=None, reach: float = 0.75, alpha: float = 0.6, gap: int = 1, keep: str = "boxes", **_
) -> AttackFn:
    """For a colour question "What is the colour of the K?": the background pixels within ``reach``
    x the target's size around its box (``gap`` px away from every object's box, so no object pixel
    changes) blended towards a wrong option's colour with weight ``alpha``. The scene's objects,
    and so the answer, are unchanged; a reader that takes the colour around the named object rather
    than the object's own picks the tint. ``keep="shapes"`` (``backdrop-tint-outline``): only the
    objects' own pixels (and ``gap`` px around their outlines) are kept, so the tint reaches into
    their boxes' corners and leaves no untinted rectangle around the target."""
    from world import COLOURS, object_mask

    if keep not in ("boxes", "shapes"):
        raise ValueError(f"backdrop-tint keep={keep!r}: choose 'boxes' or 'shapes'")

    def attack(row: dict):
        if row.get("question_type") != "colour" or len(row["target_boxes"]) != 1:
            return "backdrop-tint attacks colour questions (one target)"
        if not row.get("scene"):
            return "backdrop-tint needs the row's scene (synthetic rows)"
        from metrics import localized_ssim
        from world import Scene

        scene = Scene.from_dict(json.loads(row["scene"]))
        clean = decode_image(row["image"]).convert("RGB")
        truth = row["options"][ord(row["answer"]) - ord("A")]
        wrong = [o for o in row["options"] if o != truth and o in COLOURS]
        if not wrong:
            return "no wrong option names a colour"
        tint = wrong[int(np.random.default_rng(_row_seed(row["id"])).integers(len(wrong)))]
        x0, y0, x1, y1 = row["target_boxes"][0]
        r = reach * max(x1 - x0, y1 - y0)
        arr = np.asarray(clean, dtype=np.float64)
        h, w = arr.shape[:2]
        ys, xs = np.mgrid[0:h, 0:w]
        region = (xs >= x0 - r) & (xs < x1 + r) & (ys >= y0 - r) & (ys < y1 + r)
        if keep == "shapes":
            from scipy import ndimage

            objects = object_mask(scene)
            if objects.shape != region.shape:
                return f"the scene renders at {objects.shape[::-1]}, the image is {(w, h)}"
            region &= ~(ndimage.binary_dilation(objects, iterations=gap) if gap else objects)
        else:
            for b in [scene.image_box(o) for o in scene.visible(1e-9)] + [row["target_boxes"][0]]:
                region &= ~((xs >= b[0] - gap) & (xs < b[2] + gap) & (ys >= b[1] - gap) & (ys < b[3] + gap))
        if region.sum() == 0:
            return "no background around the target"
        arr[region] = (1 - alpha) * arr[region] + alpha * np.asarray(COLOURS[tint], dtype=np.float64)
        image = Image.fromarray(np.round(arr).clip(0, 255).astype(np.uint8))
        ssim = min(localized_ssim(clean, image, b) for b in row["target_boxes"])
        return Attacked(image, scene.to_dict(), {"tint": tint, "alpha": alpha, "keep": keep, "target_ssim_min": ssim})

    return attack


@register_attack("backdrop-tint-outline")
def backdrop_tint_outline(cfg, store=None, **params) -> AttackFn:
    """``backdrop-tint`` up to the objects' outlines (``keep="shapes"``). Beside ``backdrop-tint``,
    whose kept object boxes leave an untinted rectangle around the target, it tells a defender that
    reads the object's colour from one that reads the rectangle: an attacker trained with
    ``attacker.keep_targets`` pastes the clean target box back into every edit, the same rectangle."""
    return backdrop_tint(cfg, store, **{**params, "keep": "shapes"})


def _row_seed(row_id: str) -> int:
    """A stable per-row seed (Python's hash() of a str changes between processes)."""
    import zlib

    return zlib.crc32(row_id.encode())
