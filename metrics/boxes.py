"""Axis-aligned boxes ``[x0, y0, x1, y1]`` in image pixels (x1, y1 exclusive)."""

from __future__ import annotations


def box_area(b: list[float]) -> float:
    return max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])


def intersection(a: list[float], b: list[float]) -> float:
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


def iou(a: list[float], b: list[float]) -> float:
    inter = intersection(a, b)
    union = box_area(a) + box_area(b) - inter
    return inter / union if union > 0 else 0.0


def expand_box(b: list[float], margin: float) -> list[float]:
    return [b[0] - margin, b[1] - margin, b[2] + margin, b[3] + margin]


def clip_box(b: list[float], width: int, height: int) -> list[float]:
    return [
        min(max(b[0], 0.0), width),
        min(max(b[1], 0.0), height),
        min(max(b[2], 0.0), width),
        min(max(b[3], 0.0), height),
    ]


def transform_box(b: list[float], offset: tuple[float, float] = (0.0, 0.0), scale: float = 1.0) -> list[float]:
    """Move a box with its image: first by ``offset`` (pasting onto a canvas), then ``scale`` (resizing)."""
    dx, dy = offset
    return [(b[0] + dx) * scale, (b[1] + dy) * scale, (b[2] + dx) * scale, (b[3] + dy) * scale]
