"""Attacks as stages: Stage 2's implanter and a trained attacker version as registered attacks,
and ``attack_version``, which applies any registered attack (evaluation/attacks.py) to a dataset
version as a versioned table of clean/attacked pairs that ``evaluate_defender_version`` scores.

- ``implanter``: Stage 2's implanter (proposal, box and prompt checks, inpainting, detector,
  target SSIM) without the defender: the first verified distractor. Defender-agnostic, so every
  defender sees the same images.
- ``aot-attacker``: a trained attacker version (``version=``): its deterministic edit, kept when
  every target box keeps localized SSIM >= ``attacker.rl.reward.tau``.
"""

from __future__ import annotations

import dataclasses
import json

import polars as pl

from evaluation.attacks import Attacked, AttackFn, build_attack, register_attack
from stages.rows import ITEM_REJECTS, frame
from stages.version import VersionPart, kernel_family, single_part_version
from storage import IMAGE_DTYPE, Manifest, ShardStore, content_hash, image_cells


@register_attack("implanter")
def implanter(cfg, store=None, **_) -> AttackFn:
    from stages.implant import verified_edits
    from stages.registry import load

    models = {k: load(k, cfg.models[k]) for k in IMPLANTER_ROLES}

    def attack(row: dict):
        attempts: list[dict] = []
        for edited, context, prop, _, _, ssim_min, _ in verified_edits(row, cfg.implant, models, attempts):
            return Attacked(edited, context, {"distractors": [prop.description], "target_ssim_min": ssim_min})
        return f"no verified distractor in {len(attempts)} proposals"

    return attack


IMPLANTER_ROLES = ("judge", "inpainter", "detector", "segmenter")


@register_attack("aot-attacker")
def aot_attacker(cfg, store=None, version: str | None = None, seed: int = 0, **_) -> AttackFn:
    from stages.attacker import item_from_row, load_attacker
    from stages.curriculum import edit_items
    from training.attacker import Placement, scored_item
    from training.attacker_rewards import AttackSample, integrity

    if store is None or not version:
        raise ValueError("the aot-attacker attack needs a store and version=<attacker version>")
    editor = load_attacker(store, version, cfg.attacker.model)
    tau, steps = cfg.attacker.rl.reward.tau, cfg.attacker.curriculum.sampling_steps

    def attack(row: dict):
        a = cfg.attacker
        item = scored_item(editor, item_from_row(row, shapes=a.keep_target_shapes), a.edits_at_source_size)
        seeds = [seed * 1_000_003 + int(content_hash(row["id"], 8), 16)]
        edited = edit_items(
            editor,
            [item],
            seeds,
            steps,
            placement=Placement.of(a),
        )[0]
        # the curriculum's gate (the targets' shapes with keep_target_shapes), without its global floor
        ssim = integrity(item.image, edited, AttackSample(item.target_boxes, [], item.target_mask), tau)[
            "target_ssim_min"
        ]
        if ssim < tau:
            return f"integrity: target SSIM {ssim:.3f} < tau {tau}"
        return Attacked(
            edited, None, {"target_ssim_min": ssim, "edit_size": list(item.image.size)}
        )  # as curricula store edits

    return attack


ATTACK_ROWS = {
    "id": pl.String,
    "question_type": pl.String,
    "question": pl.String,
    "options": pl.List(pl.String),
    "answer": pl.String,
    "target_names": pl.List(pl.String),
    "target_boxes": pl.List(pl.List(pl.Float64)),
    "clean_image": IMAGE_DTYPE,
    "adversarial_image": IMAGE_DTYPE,
    "attack": pl.String,
    "meta": pl.String,
}


def attack_version(store: ShardStore, cfg, data_version: str, name: str, **params) -> Manifest:
    """Apply a registered attack to every row of a dataset version (source, extend or filter):
    a versioned table with the clean and the attacked image of every attacked row; rows the attack
    could not edit are rejects with its reason. The version id hashes the attack's name and
    parameters, the code and the input, so a rerun finds it."""
    from stages.registry import backend

    data = store.manifest(data_version)
    parents = [data.version] + [v for k, v in sorted(params.items()) if k == "version"]
    config = {
        "attack": name,
        "params": params,
        **({"attacker": dataclasses.asdict(cfg.attacker)} if name == "aot-attacker" else {}),
        **({"implant": dataclasses.asdict(cfg.implant), "models": cfg.models} if name == "implanter" else {}),
    }
    learned = name == "aot-attacker" or (
        name == "implanter" and not all(backend(r, cfg.models[r]).exact for r in IMPLANTER_ROLES)
    )

    def compute(version: str) -> VersionPart:
        fn = build_attack(name, cfg, store, **params)
        kept, edited, rejects = [], [], []
        for row in store.read(data).iter_rows(named=True):
            out = fn(row)
            if isinstance(out, str):
                rejects.append({"id": row["id"], "reason": name, "detail": out})
                continue
            kept.append(
                {k: row.get(k) for k in ATTACK_ROWS if k not in ("clean_image", "adversarial_image", "attack", "meta")}
                | {"clean_image": row["image"], "attack": name, "meta": json.dumps(out.meta)}
            )
            edited.append(out.image)
        for r, cell in zip(kept, image_cells(edited)):
            r["adversarial_image"] = cell
        return VersionPart(
            frame(kept, ATTACK_ROWS),
            len(kept) + len(rejects),
            frame(rejects, ITEM_REJECTS),
            extra={"summary": {"attacked": len(kept), "rejected": len(rejects)}},
        )

    return single_part_version(
        store,
        data.dataset,
        "attack",
        config,
        parents,
        (__name__,),
        compute,
        kernel_family([cfg.attacker.model.get("device", "cpu")]) if learned else None,
    )[0]
