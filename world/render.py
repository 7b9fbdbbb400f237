"""Exact rendering: no anti-aliasing, so every object is one flat colour and pixels are repeatable."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from world.scene import COLOURS, Background, Scene, SceneObject


def background_pixels(bg: Background, origin: list[float], size: list[int], scale: float, shift: int = 0) -> np.ndarray:
    """Background as a function of *world* coordinates, so adjacent windows join without a seam.

    ``shift`` brightens the tone (the oracle outpainter uses it to plant a visible seam).
    """
    w, h = size
    xs = np.floor(np.arange(w) / scale + origin[0]).astype(np.int64)
    ys = np.floor(np.arange(h) / scale + origin[1]).astype(np.int64)
    gx, gy = np.meshgrid(xs, ys)
    if bg.kind == "stripes":
        second = ((gx + gy) // bg.period) % 2 == 1
    elif bg.kind == "checker":
        second = ((gx // bg.period) + (gy // bg.period)) % 2 == 1
    else:
        second = np.zeros_like(gx, dtype=bool)
    tone = np.array(bg.tone, dtype=np.int16) + shift
    alt = tone - bg.contrast
    out = np.where(second[..., None], alt, tone)
    return np.clip(out, 0, 255).astype(np.uint8)


def draw_shape(draw: ImageDraw.ImageDraw, category: str, colour: str, box: list[float], fill=None) -> None:
    """Draw a shape inscribed in the integer pixel box [x0, y0, x1, y1) (x1, y1 exclusive), in
    ``colour`` or, when given, ``fill`` (a mask's value: the shape's exact pixels, ``object_mask``)."""
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    x1 -= 1
    y1 -= 1
    if x1 < x0 or y1 < y0:
        return
    fill = COLOURS[colour] if fill is None else fill
    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    if category == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=fill)
    elif category == "square":
        draw.rectangle([x0, y0, x1, y1], fill=fill)
    elif category == "triangle":
        draw.polygon([(x0, y1), (cx, y0), (x1, y1)], fill=fill)
    elif category == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
    else:
        raise ValueError(f"unknown category {category!r}")


def render(scene: Scene, background_shift: int = 0) -> Image.Image:
    """The scene's image: background, then every object that touches the window."""
    img = Image.fromarray(background_pixels(scene.background, scene.origin, scene.size, scene.scale, background_shift))
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        if scene.visible_fraction(obj) > 0:
            draw_shape(draw, obj.category, obj.colour, scene.image_box(obj))
    return img


def object_mask(scene: Scene, objects: list[SceneObject] | None = None) -> np.ndarray:
    """(H, W) bool: the pixels ``render`` paints for ``objects`` (default: every object in view),
    drawn by the same code, so the mask is the objects' exact outline rather than their boxes."""
    mask = Image.new("L", tuple(scene.size), 0)
    draw = ImageDraw.Draw(mask)
    for obj in scene.objects if objects is None else objects:
        if scene.visible_fraction(obj) > 0:
            draw_shape(draw, obj.category, obj.colour, scene.image_box(obj), fill=255)
    return np.asarray(mask) > 0


def square_in_box(box: list[float]) -> list[int]:
    """The largest centred square of integer pixels inside a box (shapes keep their aspect)."""
    x0, y0, x1, y1 = box
    side = int(math.floor(min(x1 - x0, y1 - y0)))
    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    sx0 = int(math.floor(cx - side / 2.0))
    sy0 = int(math.floor(cy - side / 2.0))
    return [sx0, sy0, sx0 + side, sy0 + side]


def draw_object_into(image: Image.Image, box: list[float], category: str, colour: str) -> tuple[Image.Image, list[int]]:
    """Draw one object in the largest square inside ``box``; no pixel outside the box changes.

    Returns the new image and the object's pixel box. The drawing happens on a crop of the box,
    so the guarantee holds by construction, not by care.
    """
    W, H = image.size
    bx0, by0 = max(0, int(math.floor(box[0]))), max(0, int(math.floor(box[1])))
    bx1, by1 = min(W, int(math.ceil(box[2]))), min(H, int(math.ceil(box[3])))
    sq = square_in_box([max(box[0], bx0), max(box[1], by0), min(box[2], bx1), min(box[3], by1)])
    out = image.copy()
    if bx1 <= bx0 or by1 <= by0 or sq[2] <= sq[0]:
        return out, sq
    crop = out.crop((bx0, by0, bx1, by1))
    draw_shape(ImageDraw.Draw(crop), category, colour, [sq[0] - bx0, sq[1] - by0, sq[2] - bx0, sq[3] - by0])
    out.paste(crop, (bx0, by0))
    return out, sq


def add_object(scene: Scene, image_box: list[int], category: str, colour: str) -> SceneObject:
    """Record a drawn object in the scene (world coordinates), as the oracle inpainter does."""
    obj = SceneObject(
        id=max((o.id for o in scene.objects), default=-1) + 1,
        category=category,
        colour=colour,
        box=scene.world_box([float(v) for v in image_box]),
    )
    scene.objects.append(obj)
    return obj
