"""Pluggable attacks: a registered callable edits one dataset row; evaluation takes any by name.

An attack is built by a factory registered under a name, ``build_attack(name, cfg, store,
**params)``, and called on a dataset row (``image``, ``question``, ``options``, ``answer``,
``target_names``, ``target_boxes``, ``scene``): it returns an ``Attacked`` (edited image, edited
scene or None, metadata) or a string saying why it could not attack this row. A new family is one
``@register_attack`` away; ``attack_version`` turns any of them into a versioned AOT-SFT-like
dataset (clean and adversarial image per row) that ``evaluate_defender_version`` scores.

Registered here:

- ``implanter``: Stage 2's implanter (proposal, box and prompt checks, inpainting, detector,
  target SSIM) without the defender: the first verified distractor. Defender-agnostic, so every
  defender sees the same images.
- ``swap-pair``: for a relation question "Where is A relative to B?", two distractors that swap
  the targets' attributes (A's colour on B's category and B's colour on A's category) placed on
  the mirrored side (A's decoy beyond B, B's decoy beyond A), so a reader that binds colour or
  shape alone reads the opposite relation. No training arm ever proposes pairs or mirrored
  placement: it is the held-out family for relation questions.
- ``option-decoys``: for a colour question, other shapes in the wrong options' colours right
  beside the target: the held-out family for colour questions.
- ``aot-attacker``: a trained attacker version (``version=``): its deterministic edit, kept when
  every target box keeps localized SSIM >= ``attacker.rl.reward.tau``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Callable

import numpy as np
import polars as pl
from PIL import Image

from stages.rows import ITEM_REJECTS, frame
from storage import IMAGE_DTYPE, Manifest, ShardStore, content_hash, decode_image, image_cells


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


@register_attack("implanter")
def implanter(cfg, store=None, **_) -> AttackFn:
    from models import load
    from stages.implant import verified_edits

    models = {k: load(k, cfg.models[k]) for k in ("judge", "inpainter", "detector", "segmenter")}

    def attack(row: dict):
        attempts: list[dict] = []
        for edited, context, prop, _, _, ssim_min, _ in verified_edits(row, cfg.stage2, models, attempts):
            return Attacked(edited, context, {"distractors": [prop.description], "target_ssim_min": ssim_min})
        return f"no verified distractor in {len(attempts)} proposals"
    return attack


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
        decoys = [(ca, kb, _mirror_box(a, b, size)),   # A's colour, beyond B
                  (cb, ka, _mirror_box(b, a, size))]   # B's colour, beyond A
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
        sides = [[x0 - gap - w, y0, x0 - gap, y1], [x1 + gap, y0, x1 + gap + w, y1],
                 [x0, y0 - gap - h, x1, y0 - gap], [x0, y1 + gap, x1, y1 + gap + h]]
        rng = np.random.default_rng(_row_seed(row["id"]))
        wrong = [wrong[i] for i in rng.permutation(len(wrong))]
        order = rng.permutation(len(sides))
        decoys = [(wrong[i % len(wrong)], others[i % len(others)], sides[j]) for i, j in enumerate(order)]
        out = _place_decoys(row, decoys[:2], margin, "colour")
        if isinstance(out, str) and len(decoys) > 2:  # both first sides blocked: try the other two
            out = _place_decoys(row, decoys[2:], margin, "colour")
        return out
    return attack


def _row_seed(row_id: str) -> int:
    """A stable per-row seed (Python's hash() of a str changes between processes)."""
    import zlib

    return zlib.crc32(row_id.encode())


@register_attack("aot-attacker")
def aot_attacker(cfg, store=None, version: str | None = None, seed: int = 0, **_) -> AttackFn:
    from metrics import localized_ssim
    from training.attacker import at_edit_size
    from training.attacker_stage import edit_items, item_from_row, load_attacker

    if store is None or not version:
        raise ValueError("the aot-attacker attack needs a store and version=<attacker version>")
    editor = load_attacker(store, version, cfg.attacker.model)
    tau, steps = cfg.attacker.rl.reward.tau, cfg.attacker.curriculum.sampling_steps

    def attack(row: dict):
        item = at_edit_size(editor, item_from_row(row))
        edited = edit_items(editor, [item], [seed * 1_000_003 + int(content_hash(row["id"], 8), 16)], steps)[0]
        ssim = min((localized_ssim(item.image, edited, b) for b in item.target_boxes), default=1.0)
        if ssim < tau:
            return f"integrity: target SSIM {ssim:.3f} < tau {tau}"
        return Attacked(edited, None, {"target_ssim_min": ssim, "edit_size": list(item.image.size)})  # as curricula store edits
    return attack


ATTACK_ROWS = {
    "id": pl.String, "question_type": pl.String, "question": pl.String, "options": pl.List(pl.String),
    "answer": pl.String, "target_names": pl.List(pl.String), "target_boxes": pl.List(pl.List(pl.Float64)),
    "clean_image": IMAGE_DTYPE, "adversarial_image": IMAGE_DTYPE, "attack": pl.String, "meta": pl.String,
}


def attack_version(store: ShardStore, cfg, data_version: str, name: str, **params) -> Manifest:
    """Apply a registered attack to every row of a dataset version (source, extend or filter):
    a versioned table with the clean and the attacked image of every attacked row; rows the attack
    could not edit are rejects with its reason. The version id hashes the attack's name and
    parameters, the code and the input, so a rerun finds it."""
    from stages.version import code_version

    data = store.manifest(data_version)
    parents = [data.version] + [v for k, v in sorted(params.items()) if k == "version"]
    config = {"attack": name, "params": params,
              **({"attacker": dataclasses.asdict(cfg.attacker)} if name == "aot-attacker" else {}),
              **({"stage2": dataclasses.asdict(cfg.stage2), "models": cfg.models} if name == "implanter" else {})}
    version = content_hash({"stage": "attack", "config": config, "code": code_version(), "parents": parents})
    done = store.manifest_at(data.dataset, "attack", version)
    if done is not None:
        return done
    fn = build_attack(name, cfg, store, **params)
    kept, edited, rejects = [], [], []
    for row in store.read(data).iter_rows(named=True):
        out = fn(row)
        if isinstance(out, str):
            rejects.append({"id": row["id"], "reason": name, "detail": out})
            continue
        kept.append({k: row.get(k) for k in ATTACK_ROWS if k not in ("clean_image", "adversarial_image", "attack", "meta")}
                    | {"clean_image": row["image"], "attack": name, "meta": json.dumps(out.meta)})
        edited.append(out.image)
    for r, cell in zip(kept, image_cells(edited)):
        r["adversarial_image"] = cell
    df = frame(kept, ATTACK_ROWS)
    rej = frame(rejects, ITEM_REJECTS)
    rec = store.write_shard(data.dataset, "attack", version, 0, content_hash(parents), len(kept) + len(rejects), df, rej)
    return store.commit(data.dataset, "attack", version, [rec], config=config, parents=parents,
                        code_version=code_version(), extra={"summary": {"attacked": len(kept), "rejected": len(rejects)}})
