"""Stage 1, quality filtering: CLIP prefilter, then composition, duplication and realism checks.

All must pass (DESIGN.md). The CLIP score is always recorded; it rejects only when
``filter.clip_threshold`` is set. A row failing several checks is rejected for the first, in
the order clip -> composition -> duplication -> realism, with every score in the detail.
"""

from __future__ import annotations

import json

import polars as pl

from models.roles import SceneChecks
from stages import rows as R
from stages.base import ShardContext
from storage import decode_image


def caption(row: dict) -> str:
    return "a photo of " + ", ".join(row["target_names"]) if row["target_names"] else "a photo"


def filter_scenes(rows: pl.DataFrame, ctx: ShardContext) -> tuple[pl.DataFrame, pl.DataFrame]:
    cfg = ctx.config.filter
    clip, judge = ctx.model("clip"), ctx.model("judge")
    records = list(rows.iter_rows(named=True))
    images = [decode_image(r["image"]) for r in records]
    scores = clip.score(images, [caption(r) for r in records])
    items = [
        SceneChecks(
            decode_image(r["original_image"]),
            img,
            tuple(r["canvas_offset"]),
            r["target_names"],
            r["original_box"],
            json.loads(r["scene"]) if r["scene"] else None,
        )
        for r, img in zip(records, images)
    ]
    verdicts = judge.check_scenes(items)  # batched: an MLLM judge generates for the whole shard at once
    kept, rejects = [], []
    for row, image, clip_score, (comp, dup, real) in zip(records, images, scores, verdicts):
        detail = json.dumps(
            {"clip": clip_score, "composition": comp.score, "duplication": dup.score, "realism": real.score}
        )
        failures = []
        if cfg.clip_threshold is not None and clip_score < cfg.clip_threshold:
            failures.append(("clip", f"CLIP score {clip_score:.3f} < {cfg.clip_threshold}"))
        for name, check in (("composition", comp), ("duplication", dup), ("realism", real)):
            if not check.passed:
                failures.append((name, check.reason))
        if failures:
            reason, why = failures[0]
            rejects.append(R.reject(row, ctx.stage, reason, f"{why}; scores {detail}"))
            continue
        out = {k: v for k, v in row.items() if k != "original_image"}
        out.update(
            clip_score=clip_score, composition_score=comp.score, duplication_score=dup.score, realism_score=real.score
        )
        kept.append(out)
    return R.frame(kept, R.FILTER), R.frame(rejects, R.REJECTS)
