"""A small synthetic task for learnability checks: exact labels, drawn from the world."""

from __future__ import annotations

import numpy as np

from models.mcq import format_prompt, letters
from training.defender import Example
from world import WorldConfig, generate_world, render

FIXED_COLOURS = ["red", "green", "blue", "yellow"]


def colour_examples(n: int, seed: int, resolution: int = 64) -> list[Example]:
    """'What is the colour of the <shape>?' over scenes holding one object whose colour is one of
    four, options always in the same order: the simplest question a tiny defender can learn."""
    out = []
    cfg = WorldConfig(resolution=resolution, objects_min=1, objects_max=1, outside_density=0.0, object_size=(0.3, 0.45))
    i = 0
    while len(out) < n:
        s = generate_world(int(np.random.SeedSequence([seed, i]).generate_state(1)[0]), cfg)
        i += 1
        obj = s.fully_visible()[0] if s.fully_visible() else None
        if obj is None or obj.colour not in FIXED_COLOURS:
            continue
        prompt = format_prompt(f"What is the colour of the {obj.category}?", FIXED_COLOURS)
        out.append(Example(f"toy-{seed}-{i}", render(s), prompt, letters(4)[FIXED_COLOURS.index(obj.colour)], 4))
    return out
