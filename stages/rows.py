"""Column schemas of each stage's rows, and the reject table that keeps every dropped row.

Boxes are ``[x0, y0, x1, y1]`` in image pixels (x1, y1 exclusive); options are a list whose
position gives the letter (A, B, ...); ``scene`` is the synthetic world's JSON (null for
imported photos).
"""

from __future__ import annotations

import json
from typing import Any

import polars as pl

from storage import IMAGE_DTYPE

BOXES = pl.List(pl.List(pl.Float64))

SOURCE = {
    "id": pl.String,
    "source": pl.String,
    "image": IMAGE_DTYPE,
    "width": pl.Int32,
    "height": pl.Int32,
    "question_type": pl.String,
    "question": pl.String,
    "options": pl.List(pl.String),
    "answer": pl.String,
    "target_names": pl.List(pl.String),
    "target_boxes": BOXES,
    "scene": pl.String,
}

EXTEND = {
    **SOURCE,
    "original_image": IMAGE_DTYPE,
    "original_box": pl.List(pl.Float64),
    "canvas_scale": pl.Float64,
    "canvas_offset": pl.List(pl.Int32),
    "resize": pl.Float64,
}

FILTER = {
    **{k: v for k, v in EXTEND.items() if k != "original_image"},
    "clip_score": pl.Float64,
    "composition_score": pl.Float64,
    "duplication_score": pl.Float64,
    "realism_score": pl.Float64,
}

IMPLANT = {
    **FILTER,
    "adversarial_image": IMAGE_DTYPE,
    "adversarial_scene": pl.String,
    "distractor_boxes": BOXES,
    "distractor_descriptions": pl.List(pl.String),
    "distractor_mask_areas": pl.List(pl.Int64),
    "detector_scores": pl.List(pl.Float64),
    "target_ssim_min": pl.Float64,
    "clean_correct": pl.Boolean,
    "defender_answers": pl.List(pl.String),
    "attempts": pl.String,
}

EXPORT = {
    "id": pl.String,
    "source": pl.String,
    "clean_image": IMAGE_DTYPE,
    "adversarial_image": IMAGE_DTYPE,
    "prompt": pl.String,
    "question": pl.String,
    "options": pl.List(pl.String),
    "answer": pl.String,
    "question_type": pl.String,
    "width": pl.Int32,
    "height": pl.Int32,
    "target_names": pl.List(pl.String),
    "target_boxes": BOXES,
    "distractor_boxes": BOXES,
    "distractor_descriptions": pl.List(pl.String),
    "distractor_mask_areas": pl.List(pl.Int64),
    "detector_scores": pl.List(pl.Float64),
    "clip_score": pl.Float64,
    "composition_score": pl.Float64,
    "target_ssim_min": pl.Float64,
    "canvas_scale": pl.Float64,
    "clean_scene": pl.String,
    "adversarial_scene": pl.String,
}

REJECTS = {
    "id": pl.String,
    "stage": pl.String,
    "reason": pl.String,  # a short category, counted in the manifest
    "detail": pl.String,  # the specifics, for a person
    "record": pl.String,  # the row's non-image fields as JSON: nothing is lost
    "image": IMAGE_DTYPE,
}

# Rejects of the training-side tables (curriculum, attack versions): an item id and why it was dropped.
ITEM_REJECTS = {"id": pl.String, "reason": pl.String, "detail": pl.String}


def frame(rows: list[dict], schema: dict) -> pl.DataFrame:
    return (
        pl.DataFrame([{k: r.get(k) for k in schema} for r in rows], schema=schema, orient="row")
        if rows
        else pl.DataFrame(schema=schema)
    )


def _jsonable(v: Any) -> Any:
    if isinstance(v, (bytes, bytearray)):
        return None
    if isinstance(v, dict):
        return None if set(v) == {"bytes", "path"} else {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_jsonable(x) for x in v]
    return v


def reject(row: dict, stage: str, reason: str, detail: str = "", image_column: str = "image") -> dict:
    """A reject row: the reason, and the row itself (fields as JSON, its main image as is)."""
    record = {k: _jsonable(v) for k, v in row.items() if not (isinstance(v, dict) and set(v) == {"bytes", "path"})}
    image = row.get(image_column)
    return {
        "id": str(row.get("id", "")),
        "stage": stage,
        "reason": reason,
        "detail": detail,
        "record": json.dumps(record, default=str),
        "image": image if isinstance(image, dict) else None,
    }
