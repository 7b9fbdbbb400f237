"""Stage 1, scene extension: outpaint each image onto a larger canvas, keeping its target boxes.

The source is pasted centred on a canvas ``canvas_scale`` times larger per side and the border
is filled by the outpainter; target boxes move with the paste (offset) and with any downscale
to ``max_pixels`` (scale). Targets become relatively smaller and the scene busier.
"""

from __future__ import annotations

import json
import math

import numpy as np
import polars as pl
from PIL import Image

from config import canvas_scale_range
from metrics import transform_box
from stages import rows as R
from stages.base import ShardContext
from storage import content_hash, decode_image, image_cells
from storage.images import ImageDecodeError


def canvas_geometry(
    width: int, height: int, scale: float, max_pixels: int
) -> tuple[tuple[int, int], tuple[int, int], float]:
    """Canvas size, paste offset (both before any downscale) and the downscale factor (<= 1)."""
    cw, ch = int(round(width * scale)), int(round(height * scale))
    offset = ((cw - width) // 2, (ch - height) // 2)
    resize = 1.0 if cw * ch <= max_pixels else math.sqrt(max_pixels / (cw * ch))
    return (cw, ch), offset, resize


def row_scale(row_id: str, cfg) -> float:
    lo, hi = canvas_scale_range(cfg.extend.canvas_scale)
    if lo == hi:
        return lo
    seed = int(content_hash({"id": row_id, "seed": cfg.extend.seed}, 15), 16)
    return float(np.random.default_rng(seed).uniform(lo, hi))


def extend_scenes(rows: pl.DataFrame, ctx: ShardContext) -> tuple[pl.DataFrame, pl.DataFrame]:
    cfg = ctx.config
    outpainter = ctx.model("outpainter")
    kept, rejects, todo = [], [], []
    for row in rows.iter_rows(named=True):
        try:
            image = decode_image(row["image"])
        except ImageDecodeError as exc:
            rejects.append(R.reject(row, ctx.stage, "bad_image", str(exc)))
            continue
        scale = row_scale(row["id"], cfg)
        canvas, offset, resize = canvas_geometry(image.width, image.height, scale, cfg.extend.max_pixels)
        todo.append((row, image, scale, canvas, offset, resize))
    # One batched call for the shard: a diffusion backend groups same-size canvases.
    painted_all = outpainter.outpaint_many(
        [t[1] for t in todo],
        [t[3] for t in todo],
        [t[4] for t in todo],
        [json.loads(t[0]["scene"]) if t[0]["scene"] else None for t in todo],
    )
    done = []
    for (row, image, scale, canvas, offset, resize), painted in zip(todo, painted_all):
        if painted.image.size != canvas:
            rejects.append(
                R.reject(
                    row, ctx.stage, "outpaint_failed", f"outpainter returned {painted.image.size}, expected {canvas}"
                )
            )
            continue
        extended, original = painted.image.convert("RGB"), None
        scene = painted.context
        if resize < 1.0:
            size = (max(1, round(canvas[0] * resize)), max(1, round(canvas[1] * resize)))
            extended = extended.resize(size, Image.Resampling.LANCZOS)
            original = image.resize(
                (max(1, round(image.width * resize)), max(1, round(image.height * resize))), Image.Resampling.LANCZOS
            )
            if scene is not None:
                scene = dict(scene, scale=scene["scale"] * resize, size=list(size))
        done.append((row, image, scale, offset, resize, extended, original, scene))
    # Encode the shard's new images in parallel; an unresized original keeps its stored bytes.
    cells = image_cells([d[5] for d in done] + [d[6] for d in done if d[6] is not None])
    new_originals = iter(cells[len(done) :])
    for (row, image, scale, offset, resize, extended, original, scene), cell in zip(done, cells):
        out = dict(row)
        out.update(
            image=cell,
            width=extended.width,
            height=extended.height,
            target_boxes=[transform_box(b, offset, resize) for b in row["target_boxes"]],
            scene=json.dumps(scene) if scene is not None else None,
            original_image=next(new_originals) if original is not None else row["image"],
            original_box=transform_box([0.0, 0.0, float(image.width), float(image.height)], offset, resize),
            canvas_scale=scale,
            canvas_offset=[int(round(offset[0] * resize)), int(round(offset[1] * resize))],
            resize=resize,
        )
        kept.append(out)
    return R.frame(kept, R.EXTEND), R.frame(rejects, R.REJECTS)
