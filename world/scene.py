"""Seeded procedural worlds of flat-coloured shapes on a textured plane.

A *world* is an unbounded plane (in practice a square of ``extent`` source-windows per side,
centred on the source window) holding non-overlapping objects. A *scene* is a window onto it:
``origin`` (world pixels), ``size`` (image pixels) and ``scale`` (image pixels per world
pixel). Because the world extends past the source window, the renderer can draw the region
around a scene exactly (the oracle outpainter), and every object in it is known (the oracle
judge). All geometry is integer world pixels at ``resolution`` pixels per source-window side,
so rendering is exact and deterministic.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field

import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 90, 220),
    "yellow": (230, 190, 20),
    "purple": (150, 60, 190),
    "orange": (245, 130, 30),
}
CATEGORIES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
# Light, low-saturation tones, far (in RGB) from every object colour.
BACKGROUND_TONES: tuple[tuple[int, int, int], ...] = ((232, 228, 220), (220, 228, 232), (226, 232, 220))
BACKGROUND_KINDS: tuple[str, ...] = ("plain", "stripes", "checker")


@dataclass
class SceneObject:
    id: int
    category: str
    colour: str
    box: list[float]  # [x0, y0, x1, y1] in world pixels, x1/y1 exclusive

    @property
    def name(self) -> str:
        return f"{self.colour} {self.category}"


@dataclass
class Background:
    kind: str
    tone: tuple[int, int, int]
    period: int  # pattern period in world pixels
    contrast: int  # tone difference of the pattern's second colour


@dataclass
class WorldConfig:
    resolution: int = 128  # pixels per side of the source window
    extent: float = 2.4  # world side in source windows (>= the largest outpainting scale + margin)
    objects_min: int = 3  # objects fully inside the source window
    objects_max: int = 5
    outside_density: float = 0.35  # objects per source-window area outside it, relative to inside
    object_size: tuple[float, float] = (0.10, 0.18)  # side, as a fraction of the window side
    min_gap: float = 0.03  # free space between objects, fraction of the window side


@dataclass
class Scene:
    """A window onto a world. ``objects`` holds every object of the world, visible or not."""

    seed: int
    resolution: int
    background: Background
    objects: list[SceneObject]
    origin: list[float]  # world pixel at the image's top-left corner
    size: list[int]  # image width, height in pixels
    scale: float = 1.0  # image pixels per world pixel
    artefacts: list[str] = field(default_factory=list)  # known defects (e.g. an outpainting seam)

    # ------------------------------------------------------------ geometry
    def image_box(self, obj: SceneObject) -> list[float]:
        ox, oy = self.origin
        x0, y0, x1, y1 = obj.box
        s = self.scale
        return [(x0 - ox) * s, (y0 - oy) * s, (x1 - ox) * s, (y1 - oy) * s]

    def world_box(self, image_box: list[float]) -> list[float]:
        ox, oy = self.origin
        s = self.scale
        x0, y0, x1, y1 = image_box
        return [x0 / s + ox, y0 / s + oy, x1 / s + ox, y1 / s + oy]

    def visible_fraction(self, obj: SceneObject) -> float:
        x0, y0, x1, y1 = self.image_box(obj)
        w, h = self.size
        ix = max(0.0, min(x1, w) - max(x0, 0.0))
        iy = max(0.0, min(y1, h) - max(y0, 0.0))
        area = (x1 - x0) * (y1 - y0)
        return ix * iy / area if area > 0 else 0.0

    def visible(self, min_fraction: float = 0.5) -> list[SceneObject]:
        """Objects at least ``min_fraction`` inside the image: what a viewer would count."""
        return [o for o in self.objects if self.visible_fraction(o) >= min_fraction]

    def fully_visible(self) -> list[SceneObject]:
        return [o for o in self.objects if self.visible_fraction(o) >= 1.0]

    def find(self, object_id: int) -> SceneObject:
        for o in self.objects:
            if o.id == object_id:
                return o
        raise KeyError(f"no object {object_id} in the scene")

    # -------------------------------------------------------- serialization
    def to_dict(self) -> dict:
        d = asdict(self)
        d["background"]["tone"] = list(self.background.tone)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Scene":
        bg = d["background"]
        return cls(
            seed=int(d["seed"]),
            resolution=int(d["resolution"]),
            background=Background(bg["kind"], tuple(bg["tone"]), int(bg["period"]), int(bg["contrast"])),
            objects=[
                SceneObject(int(o["id"]), o["category"], o["colour"], [float(v) for v in o["box"]])
                for o in d["objects"]
            ],
            origin=[float(v) for v in d["origin"]],
            size=[int(v) for v in d["size"]],
            scale=float(d.get("scale", 1.0)),
            artefacts=list(d.get("artefacts", [])),
        )

    def copy(self) -> "Scene":
        return copy.deepcopy(self)


def _overlaps(a: list[float], b: list[float], gap: float) -> bool:
    return not (a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1])


def generate_world(seed: int, config: WorldConfig | None = None) -> Scene:
    """A world and its source window (origin 0,0, one resolution per side), from a seed alone."""
    cfg = config or WorldConfig()
    rng = np.random.default_rng(seed)
    res = cfg.resolution
    background = Background(
        kind=str(rng.choice(BACKGROUND_KINDS)),
        tone=BACKGROUND_TONES[int(rng.integers(len(BACKGROUND_TONES)))],
        period=int(rng.integers(max(3, res // 16), max(4, res // 6))),
        contrast=int(rng.integers(6, 14)),
    )
    gap = cfg.min_gap * res
    lo = -(cfg.extent - 1.0) / 2.0 * res
    hi = res - lo
    objects: list[SceneObject] = []

    def place(region: tuple[float, float, float, float], inside_window: bool) -> bool:
        for _ in range(60):  # rejection sampling: give up on this object after 60 tries
            side = round(rng.uniform(*cfg.object_size) * res)
            x0 = round(rng.uniform(region[0], region[2] - side))
            y0 = round(rng.uniform(region[1], region[3] - side))
            box = [float(x0), float(y0), float(x0 + side), float(y0 + side)]
            if not inside_window and _overlaps(box, [0, 0, res, res], -side * 0.5):
                continue  # outside objects may straddle the window edge, but mostly lie outside
            if any(_overlaps(box, o.box, gap) for o in objects):
                continue
            objects.append(
                SceneObject(
                    id=len(objects),
                    category=str(rng.choice(CATEGORIES)),
                    colour=str(rng.choice(list(COLOURS))),
                    box=box,
                )
            )
            return True
        return False

    n_inside = int(rng.integers(cfg.objects_min, cfg.objects_max + 1))
    margin = 1.0
    for _ in range(n_inside):
        place((margin, margin, res - margin, res - margin), True)
    outer_area = cfg.extent**2 - 1.0
    n_outside = int(round(n_inside * outer_area * cfg.outside_density))
    for _ in range(n_outside):
        place((lo, lo, hi, hi), False)
    return Scene(seed=seed, resolution=res, background=background, objects=objects, origin=[0.0, 0.0], size=[res, res])
