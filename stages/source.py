"""Source stage: synthetic scenes with V*-style questions (scene i is a pure function of (seed, i))."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import polars as pl

from stages import rows as R
from stages.base import ShardContext
from storage import image_cell
from world import NoQuestion, WorldConfig, generate_world, make_question, render

MAX_ATTEMPTS = 25  # worlds tried per scene index before the index becomes a reject row


def scene_row(seed: int, index: int, cfg) -> dict:
    """One source row, or raise NoQuestion after MAX_ATTEMPTS worlds without a valid question."""
    s = cfg.source
    wcfg = WorldConfig(
        resolution=s.resolution,
        objects_min=s.objects_min,
        objects_max=s.objects_max,
        outside_density=s.outside_density,
        object_size=tuple(s.object_size),
    )
    weights = np.asarray(s.question_weights, dtype=float)
    weights = weights / weights.sum()
    last = None
    for attempt in range(MAX_ATTEMPTS):
        world_seed = int(np.random.SeedSequence([seed, index, attempt]).generate_state(1)[0])
        rng = np.random.default_rng(world_seed)
        qtype = s.question_types[int(rng.choice(len(weights), p=weights))]
        scene = generate_world(world_seed, wcfg)
        try:
            q = make_question(scene, qtype, rng, s.shuffle_options, s.colour_options)
        except NoQuestion as exc:
            last = exc
            continue
        image = render(scene)
        return {
            "id": f"syn-{seed}-{index:06d}",
            "source": "synthetic",
            "image": image_cell(image),
            "width": image.width,
            "height": image.height,
            "question_type": q.type,
            "question": q.text,
            "options": q.options,
            "answer": q.answer,
            "target_names": q.target_names,
            "target_boxes": [scene.image_box(scene.find(t)) for t in q.target_ids],
            "scene": json.dumps(scene.to_dict()),
        }
    raise NoQuestion(f"no valid question in {MAX_ATTEMPTS} worlds (last: {last})")


def generate_scenes(_: pl.DataFrame, ctx: ShardContext) -> tuple[pl.DataFrame, pl.DataFrame]:
    kept, rejects = [], []
    for i in range(ctx.start, ctx.stop):
        try:
            kept.append(scene_row(ctx.config.source.seed, i, ctx.config))
        except NoQuestion as exc:
            rejects.append(
                R.reject({"id": f"syn-{ctx.config.source.seed}-{i:06d}"}, ctx.stage, "no_question", str(exc))
            )
    return R.frame(kept, R.SOURCE), R.frame(rejects, R.REJECTS)


def world_rows(n: int, seed: int, cfg=None, keep=lambda row: True) -> list[dict]:
    """The first ``n`` source rows (that ``keep`` accepts) of a synthetic world (``cfg.source``:
    question mix, resolution, objects; default: the default world) under ``seed``."""
    from config import PipelineConfig

    cfg, out, i = cfg or PipelineConfig(), [], 0
    while len(out) < n:
        try:
            row = scene_row(seed, i, cfg)
        except NoQuestion:
            row = None
        i += 1
        if row and keep(row):
            out.append(row)
    return out


def heldout_config(cfg, scenes: int | None = None):
    """The held-out scenes: the same world settings under ``source.seed +
    coevolution.heldout_seed_offset``, never trained on (``scenes``: default
    ``coevolution.heldout_scenes``). Every held-out evaluation uses this one definition."""
    c = cfg.coevolution
    return world_config(cfg, c.heldout_seed_offset, scenes or c.heldout_scenes)


def warmup_config(cfg):
    """Defender 0's warm-up pool (``coevolution.warmup_scenes`` > 0): fresh scenes of the same world,
    with at least ``coevolution.warmup_objects_min`` objects each where that is set."""
    c = cfg.coevolution
    pool = world_config(cfg, c.warmup_seed_offset, c.warmup_scenes)
    if not c.warmup_objects_min:
        return pool
    return dataclasses.replace(pool, source=dataclasses.replace(pool.source, objects_min=c.warmup_objects_min))


def cold_start_config(cfg):
    """The attacker's cold-start pool (``attacker.cold_start_scenes`` > 0): fresh scenes of the same
    world, filtered like the run's own, then edited by the oracle implanter (``Steps.cold_start_pool``)."""
    a = cfg.attacker
    return world_config(cfg, a.cold_start_seed_offset, a.cold_start_scenes)


def world_config(cfg, seed_offset: int, scenes: int):
    """The same world settings under ``source.seed + seed_offset``, ``scenes`` scenes."""
    return dataclasses.replace(
        cfg, source=dataclasses.replace(cfg.source, seed=cfg.source.seed + seed_offset, num_scenes=scenes)
    )
