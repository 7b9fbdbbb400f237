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
  placement: it is the held-out family.
- ``aot-attacker``: a trained attacker version (``version=``): its deterministic edit, kept when
  every target box keeps localized SSIM >= ``attacker.rl.reward.tau``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Callable

import polars as pl
from PIL import Image

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


@register_attack("swap-pair")
def swap_pair(cfg, store=None, margin: float = 2.0, **_) -> AttackFn:
    from metrics import expand_box, intersection, localized_ssim
    from world import CATEGORIES, Scene, add_object, answer_from_scene, draw_object_into, parse_expression

    def attack(row: dict):
        if row.get("question_type", "relative_position") != "relative_position" or len(row["target_boxes"]) != 2:
            return "swap-pair attacks relation questions (two targets)"
        if not row.get("scene"):
            return "swap-pair needs the row's scene (synthetic rows)"
        scene = Scene.from_dict(json.loads(row["scene"]))
        clean = decode_image(row["image"])
        image = clean
        (ca, ka), (cb, kb) = (parse_expression(n) for n in row["target_names"])
        if ka == kb:  # swapping would recreate a target: borrow a third category instead
            kb = next(c for c in CATEGORIES if c != ka)
        decoys = [((ca, kb), row["target_boxes"][0], row["target_boxes"][1]),   # A's colour, beyond B
                  ((cb, ka), row["target_boxes"][1], row["target_boxes"][0])]   # B's colour, beyond A
        occupied = [scene.image_box(o) for o in scene.visible(1e-9)]
        placed = []
        for (colour, category), own, about in decoys:
            if (colour, category) in ((ca, ka), (cb, kb)) or colour is None:
                continue
            box = _mirror_box(own, about, image.size)
            if any(intersection(box, expand_box(o, margin)) > 0 for o in occupied):
                continue
            image, drawn = draw_object_into(image, box, category, colour)
            add_object(scene, drawn, category, colour)
            occupied.append([float(v) for v in drawn])
            placed.append(f"{colour} {category}")
        if not placed:
            return "no free mirrored place for either decoy"
        # Exact integrity: the targets' pixels and the question's answer are unchanged.
        ssim = min(localized_ssim(clean, image, b) for b in row["target_boxes"])
        if answer_from_scene("relative_position", row["question"], scene, row["options"]) != row["answer"]:
            return "the decoys changed the answer"
        return Attacked(image, scene.to_dict(), {"distractors": placed, "target_ssim_min": ssim})
    return attack


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
    df = pl.DataFrame(kept, schema=ATTACK_ROWS, orient="row") if kept else pl.DataFrame(schema=ATTACK_ROWS)
    rej = pl.DataFrame(rejects, schema={"id": pl.String, "reason": pl.String, "detail": pl.String}) if rejects \
        else pl.DataFrame(schema={"id": pl.String, "reason": pl.String, "detail": pl.String})
    rec = store.write_shard(data.dataset, "attack", version, 0, content_hash(parents), len(kept) + len(rejects), df, rej)
    return store.commit(data.dataset, "attack", version, [rec], config=config, parents=parents,
                        code_version=code_version(), extra={"summary": {"attacked": len(kept), "rejected": len(rejects)}})
