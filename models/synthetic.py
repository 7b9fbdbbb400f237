"""Oracle backends for the synthetic scene world (the ``synthetic`` preset).

The renderer plays outpainter and inpainter; scene metadata answers the judge, detector and
segmenter exactly. They need the row's scene as ``context`` and say so when it is missing
(imported photos carry none: run those with the ``tiny`` or ``full`` preset).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from metrics import iou, region_ssim
from models.roles import Box, CheckResult, Context, Detection, JudgeBase, Painted, Painter, Proposal
from world import (
    CATEGORIES,
    COLOURS,
    Scene,
    add_object,
    draw_object_into,
    matches,
    parse_expression,
    question_type_of,
    render,
)


class MissingSceneError(ValueError):
    pass


def require_scene(context: Context, role: str) -> Scene:
    if not context or "objects" not in context:
        raise MissingSceneError(
            f"the synthetic {role} needs the row's scene metadata, and this row has none "
            "(imported images: use --preset tiny or --preset full)"
        )
    return Scene.from_dict(context)


class SceneOutpainter(Painter):
    """Renders the world around the scene. ``seam_rate`` of extensions get a visibly brighter
    border (a seam), recorded in the scene's artefacts so the realism check has work to do."""

    def __init__(self, seam_rate: float = 0.1, seam_shift: int = 18):
        self.seam_rate = seam_rate
        self.seam_shift = seam_shift

    def outpaint(
        self, image: Image.Image, canvas_size: tuple[int, int], offset: tuple[int, int], context: Context
    ) -> Painted:
        scene = require_scene(context, "outpainter")
        new = scene.copy()
        new.origin = [scene.origin[0] - offset[0] / scene.scale, scene.origin[1] - offset[1] / scene.scale]
        new.size = [int(canvas_size[0]), int(canvas_size[1])]
        seam = np.random.default_rng([scene.seed, *new.size, 7]).random() < self.seam_rate
        canvas = render(new, background_shift=self.seam_shift if seam else 0)
        canvas.paste(image, (int(offset[0]), int(offset[1])))
        if seam:
            new.artefacts.append("seam")
        return Painted(canvas, new.to_dict(), {"seam": bool(seam)})


class SceneInpainter(Painter):
    def fill(self, image: Image.Image, box: Box, description: str, context: Context) -> Painted:
        scene = require_scene(context, "inpainter")
        colour, category = parse_expression(description)
        if colour is None or category is None:
            # Nothing it can draw: return the image untouched; the detector check will reject it.
            return Painted(image.copy(), scene.to_dict(), {"drawn": False})
        out, drawn_box = draw_object_into(image, box, category, colour)
        if drawn_box[2] > drawn_box[0]:
            add_object(scene, drawn_box, category, colour)
        return Painted(out, scene.to_dict(), {"drawn": drawn_box[2] > drawn_box[0], "object_box": drawn_box})


class SceneJudge(JudgeBase):
    """Answers the judge's questions from the scene; proposes confusable distractors."""

    def __init__(self, composition_ssim_min: float = 0.98, square_fraction: float = 0.8):
        self.composition_ssim_min = composition_ssim_min
        self.square_fraction = square_fraction

    def check_composition(
        self, original: Image.Image, extended: Image.Image, offset: tuple[int, int], context: Context
    ) -> CheckResult:
        x, y = int(offset[0]), int(offset[1])
        w, h = original.size
        region = np.asarray(extended)[y : y + h, x : x + w]
        orig = np.asarray(original)
        if region.shape != orig.shape:
            return CheckResult(False, 0.0, f"original does not fit the canvas at offset {offset}")
        score = region_ssim(orig, region)
        if score < self.composition_ssim_min:
            return CheckResult(
                False, score, f"original content changed (SSIM {score:.3f} < {self.composition_ssim_min})"
            )
        return CheckResult(True, score)

    def check_duplication(
        self, image: Image.Image, target_names: list[str], original_box: Box, context: Context
    ) -> CheckResult:
        scene = require_scene(context, "judge")
        dupes = []
        for o in scene.visible(1e-9):
            b = scene.image_box(o)
            inside = (
                b[0] >= original_box[0]
                and b[1] >= original_box[1]
                and b[2] <= original_box[2]
                and b[3] <= original_box[3]
            )
            if not inside and any(matches(name, o) for name in target_names):
                dupes.append(f"{o.name} at {[round(v) for v in b]}")
        if dupes:
            return CheckResult(False, float(len(dupes)), "new instance of a target: " + "; ".join(dupes))
        return CheckResult(True, 0.0)

    def check_realism(self, image: Image.Image, context: Context) -> CheckResult:
        scene = require_scene(context, "judge")
        if scene.artefacts:
            return CheckResult(False, 0.0, "artefacts: " + ", ".join(scene.artefacts))
        return CheckResult(True, 1.0)

    def propose_distractors(
        self,
        image: Image.Image,
        question: str,
        target_names: list[str],
        target_boxes: list[Box],
        k: int,
        seed: int,
        context: Context,
    ) -> list[Proposal]:
        """Confusable objects: a target's colour on another category, or its category in another
        colour (a target named by category alone: another category, often in the target's colour),
        at random places and sizes. Some boxes will overlap a target, leave the image or
        be elongated: the box and detector checks are there to catch exactly that."""
        scene = require_scene(context, "judge")
        rng = np.random.default_rng(seed)
        W, H = image.size
        sizes = [scene.image_box(o)[2] - scene.image_box(o)[0] for o in scene.visible(1e-9)] or [0.12 * min(W, H)]
        typical = float(np.median(sizes))
        asks_colour = question_type_of(question) == "colour"
        proposals = []
        for _ in range(k):
            colour, category = (
                parse_expression(target_names[int(rng.integers(len(target_names)))]) if target_names else (None, None)
            )
            if colour is None and category is not None:
                # A target named by its category alone (colour and count questions): any instance
                # of that category would change the answer, so the confusable distractor is another
                # category. Asked for the target's colour, a reader who takes the distractor for the
                # target answers the distractor's colour, so it gets a colour the target lacks (in the
                # target's own it would be harmless: experiments/RESULTS.md measures both); asked to
                # count, a target instance's colour half of the time.
                own = sorted({o.colour for o in scene.visible(1e-9) if o.category == category})
                category = str(rng.choice([c for c in CATEGORIES if c != category]))
                if asks_colour:
                    colour = str(rng.choice([c for c in COLOURS if c not in own] or list(COLOURS)))
                else:
                    colour = str(rng.choice(own)) if own and rng.random() < 0.5 else str(rng.choice(list(COLOURS)))
            elif colour is not None and rng.random() < 0.5:
                category = str(rng.choice([c for c in CATEGORIES if c != category]))
            else:
                colour = str(rng.choice([c for c in COLOURS if c != colour]))
                category = category or str(rng.choice(CATEGORIES))
            side = typical * rng.uniform(0.8, 1.25)
            bw, bh = side, side
            if rng.random() > self.square_fraction:
                bw = side * rng.uniform(1.6, 2.4)  # elongated: the drawn shape won't fill it
            x0 = rng.uniform(-0.1 * bw, W - 0.9 * bw)
            y0 = rng.uniform(-0.1 * bh, H - 0.9 * bh)
            proposals.append(Proposal([round(x0), round(y0), round(x0 + bw), round(y0 + bh)], f"{colour} {category}"))
        return proposals


class SceneDetector:
    def detect(self, image: Image.Image, phrase: str, context: Context) -> list[Detection]:
        scene = require_scene(context, "detector")
        return [Detection(scene.image_box(o), 1.0, o.name) for o in scene.visible(1e-9) if matches(phrase, o)]


class SceneSegmenter:
    def segment(self, image: Image.Image, box: Box, context: Context) -> np.ndarray:
        scene = require_scene(context, "segmenter")
        arr = np.asarray(image)
        mask = np.zeros(arr.shape[:2], dtype=bool)
        objs = scene.visible(1e-9)
        if not objs:
            return mask
        obj = max(objs, key=lambda o: iou(scene.image_box(o), box))
        if iou(scene.image_box(obj), box) <= 0:
            return mask
        x0, y0, x1, y1 = (int(round(v)) for v in scene.image_box(obj))
        x0, y0 = max(0, x0), max(0, y0)
        colour = np.array(COLOURS[obj.colour], dtype=np.uint8)
        mask[y0:y1, x0:x1] = np.all(arr[y0:y1, x0:x1] == colour, axis=-1)
        return mask
