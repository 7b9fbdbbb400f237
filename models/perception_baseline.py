"""A perception-limited scripted defender for the synthetic world (backend ``perception-baseline``).

It really looks at the image: pixels are matched to the world's palette and split into blobs
(connected components). Its limits are deliberate and documented, so Stage 2 has something to
fool before a neural defender exists:

- An object named "red circle" is taken to be the *first red blob in raster order* (top-most,
  then left-most), whatever its shape: a red triangle placed above the red circle fools it.
- Shape is guessed from how much of its bounding box a blob fills (square ~1.0, circle ~0.79,
  triangle and diamond ~0.5): diamonds are seen as triangles.

It implements the MLLM interface (prompt in, text out) and answers as ``\\boxed{X}``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

from models.mcq import letters, parse_prompt
from world import COLOURS, parse_expression, relation

TOLERANCE = 24  # max per-channel distance to a palette colour
MIN_AREA = 6


@dataclass
class Blob:
    colour: str
    box: list[float]
    area: int
    first: int  # raster index of the top-most, left-most pixel

    @property
    def shape(self) -> str:
        fill = self.area / max(1.0, (self.box[2] - self.box[0]) * (self.box[3] - self.box[1]))
        if fill >= 0.9:
            return "square"
        if fill >= 0.66:
            return "circle"
        return "triangle"


def find_blobs(image: Image.Image) -> list[Blob]:
    arr = np.asarray(image.convert("RGB")).astype(np.int16)
    w = arr.shape[1]
    blobs = []
    for name, rgb in COLOURS.items():
        mask = np.all(np.abs(arr - np.array(rgb, dtype=np.int16)) <= TOLERANCE, axis=-1)
        labels, n = ndimage.label(mask, structure=np.ones((3, 3)))
        for i, sl in enumerate(ndimage.find_objects(labels), start=1):
            if sl is None:
                continue
            region = labels[sl] == i
            area = int(region.sum())
            if area < MIN_AREA:
                continue
            ys, xs = np.nonzero(region)
            first = int((ys[0] + sl[0].start) * w + xs[0] + sl[1].start)
            box = [float(sl[1].start), float(sl[0].start), float(sl[1].stop), float(sl[0].stop)]
            blobs.append(Blob(name, box, area, first))
    return sorted(blobs, key=lambda b: b.first)


class PerceptionBaselineDefender:
    def _answer(self, image: Image.Image, question: str, options: list[str]) -> str | None:
        blobs = find_blobs(image)
        if question.startswith("Where is the ") and " relative to the " in question:
            a_name, b_name = question.removeprefix("Where is the ").removesuffix("?").split(" relative to the ")
            a = next((b for b in blobs if b.colour == parse_expression(a_name)[0]), None)
            b = next((b for b in blobs if b.colour == parse_expression(b_name)[0]), None)
            return relation(a.box, b.box) if a and b else None
        if question.startswith("What is the colour of the "):
            cat = question.removeprefix("What is the colour of the ").removesuffix("?")
            hit = [b for b in blobs if b.shape == cat]
            return max(hit, key=lambda b: b.area).colour if hit else None
        if question.startswith("How many "):
            cat = question.removeprefix("How many ").removesuffix("s are there in the image?")
            return str(sum(b.shape == cat for b in blobs))
        if question.startswith("Is there a "):
            colour, cat = parse_expression(question.removeprefix("Is there a "))
            return "yes" if any(b.colour == colour and b.shape == cat for b in blobs) else "no"
        return None

    def generate(
        self, images: list[Image.Image], prompts: list[str], *, temperature: float = 0.0, seed: int = 0
    ) -> list[str]:
        out = []
        for image, prompt in zip(images, prompts):
            question, options = parse_prompt(prompt)
            guess = self._answer(image, question, options)
            letter = letters(len(options))[options.index(guess)] if guess in options else "A"
            out.append(f"\\boxed{{{letter}}}")
        return out
