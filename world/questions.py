"""V*-style multiple-choice questions whose answers follow exactly from the scene.

Types: ``relative_position`` (V*'s spatial relation; the default and the one Stage 2 attacks),
``colour``, ``count`` and ``existence``. Every question names its targets by a referring
expression ("red circle", or "circle" for counting); the targets are the objects it refers to.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from world.scene import CATEGORIES, COLOURS, Scene, SceneObject

QUESTION_TYPES = ("relative_position", "colour", "count", "existence")
RELATIONS = ("left", "right", "above", "below")
# A relation is asked only when one axis dominates by this ratio, so the answer is unambiguous.
DOMINANCE = 1.5


class NoQuestion(ValueError):
    """The scene cannot support a question of the requested type."""


@dataclass
class Question:
    type: str
    text: str
    options: list[str]
    answer: str  # letter
    target_ids: list[int]
    target_names: list[str]  # referring expressions of the targets, as named in the question


def letters(n: int) -> list[str]:
    """Option letters by position: A, B, C, ..."""
    return [chr(ord("A") + i) for i in range(n)]


def parse_expression(text: str) -> tuple[str | None, str | None]:
    """(colour, category) named in a short description; None where not named."""
    words = text.lower().replace(",", " ").split()
    colour = next((w for w in words if w in COLOURS), None)
    category = next((c for c in CATEGORIES if c in words or c + "s" in words), None)
    return colour, category


def matches(expression: str, obj: SceneObject) -> bool:
    """Does the referring expression refer to this object?"""
    colour, category = parse_expression(expression)
    return (category is None or obj.category == category) and (colour is None or obj.colour == colour)


def relation(a: list[float], b: list[float], dominance: float = DOMINANCE) -> str | None:
    """Where box ``a`` lies relative to box ``b`` (image coordinates, y down); None if unclear."""
    dx = (a[0] + a[2]) / 2.0 - (b[0] + b[2]) / 2.0
    dy = (a[1] + a[3]) / 2.0 - (b[1] + b[3]) / 2.0
    if abs(dx) >= dominance * abs(dy) and dx != 0:
        return "left" if dx < 0 else "right"
    if abs(dy) >= dominance * abs(dx) and dy != 0:
        return "above" if dy < 0 else "below"
    return None


# Canonical option order when options are not shuffled: the world's own orders, never "correct first".
_CANONICAL = {**{r: i for i, r in enumerate(RELATIONS)}, **{c: i for i, c in enumerate(COLOURS)}, "yes": 0, "no": 1}


def _shuffle(options: list[str], correct: str, rng: np.random.Generator, shuffle: bool = True) -> tuple[list[str], str]:
    if shuffle:
        order = rng.permutation(len(options))
        options = [options[i] for i in order]
    else:  # fixed: relations, colours, yes/no in the world's order, counts ascending
        options = sorted(options, key=lambda o: int(o) if o.isdigit() else _CANONICAL[o])
    return options, letters(len(options))[options.index(correct)]


def _unique_by_name(objs: list[SceneObject]) -> list[SceneObject]:
    names = [o.name for o in objs]
    return [o for o in objs if names.count(o.name) == 1]


def relative_position(scene: Scene, rng: np.random.Generator, shuffle: bool = True) -> Question:
    visible = scene.visible(0.0 + 1e-9)
    candidates = [o for o in _unique_by_name(visible) if scene.visible_fraction(o) >= 1.0]
    pairs = []
    for a in candidates:
        for b in candidates:
            if a.id != b.id and relation(scene.image_box(a), scene.image_box(b)) is not None:
                pairs.append((a, b))
    if not pairs:
        raise NoQuestion("no pair of uniquely named objects with a clear relation")
    a, b = pairs[int(rng.integers(len(pairs)))]
    rel = relation(scene.image_box(a), scene.image_box(b))
    options, answer = _shuffle(list(RELATIONS), rel, rng, shuffle)
    return Question(
        "relative_position",
        f"Where is the {a.name} relative to the {b.name}?",
        options,
        answer,
        [a.id, b.id],
        [a.name, b.name],
    )


def colour(scene: Scene, rng: np.random.Generator, shuffle: bool = True, n_options: int = 4) -> Question:
    visible = scene.visible(1e-9)
    cats = [o.category for o in visible]
    candidates = [o for o in visible if cats.count(o.category) == 1 and scene.visible_fraction(o) >= 1.0]
    if not candidates:
        raise NoQuestion("no category appears exactly once")
    obj = candidates[int(rng.integers(len(candidates)))]
    others = [c for c in COLOURS if c != obj.colour]
    wrong = [others[i] for i in rng.choice(len(others), size=n_options - 1, replace=False)]
    options, answer = _shuffle([obj.colour, *wrong], obj.colour, rng, shuffle)
    return Question("colour", f"What is the colour of the {obj.category}?", options, answer, [obj.id], [obj.category])


def count(scene: Scene, rng: np.random.Generator, shuffle: bool = True) -> Question:
    # Count only objects that are clearly in or clearly out: a half-visible one makes the truth unclear.
    ambiguous = {o.category for o in scene.objects if 0 < scene.visible_fraction(o) < 1.0}
    cats = [c for c in CATEGORIES if c not in ambiguous]
    if not cats:
        raise NoQuestion("every category has a partly visible instance")
    cat = cats[int(rng.integers(len(cats)))]
    targets = [o for o in scene.fully_visible() if o.category == cat]
    n = len(targets)
    pool = [k for k in range(max(0, n - 3), n + 4) if k != n]
    wrong = [pool[i] for i in rng.choice(len(pool), size=3, replace=False)]
    options, answer = _shuffle([str(n), *map(str, wrong)], str(n), rng, shuffle)
    return Question(
        "count", f"How many {cat}s are there in the image?", options, answer, [o.id for o in targets], [cat]
    )


def existence(scene: Scene, rng: np.random.Generator, shuffle: bool = True) -> Question:
    fully = scene.fully_visible()
    partial = {o.name for o in scene.objects if 0 < scene.visible_fraction(o) < 1.0}
    if rng.random() < 0.5 and fully:
        obj = fully[int(rng.integers(len(fully)))]
        if obj.name in partial:
            raise NoQuestion("the asked object is also partly visible")
        name, targets, truth = obj.name, [o for o in fully if o.name == obj.name], "yes"
    else:
        present = {o.name for o in scene.visible(1e-9)}
        absent = [f"{c} {k}" for c in COLOURS for k in CATEGORIES if f"{c} {k}" not in present]
        name, targets, truth = absent[int(rng.integers(len(absent)))], [], "no"
    options, answer = _shuffle(["yes", "no"], truth, rng, shuffle)
    return Question("existence", f"Is there a {name} in the image?", options, answer, [o.id for o in targets], [name])


GENERATORS = {"relative_position": relative_position, "colour": colour, "count": count, "existence": existence}
# Each type's question text starts with its own words: how a reader of the text alone (the
# synthetic judge) tells which type it was asked.
PREFIXES = {
    "relative_position": "Where is the ",
    "colour": "What is the colour of the ",
    "count": "How many ",
    "existence": "Is there a ",
}


def question_type_of(text: str) -> str | None:
    """The type whose template ``text`` was written from, or None for a question of another source."""
    return next((t for t, p in PREFIXES.items() if text.startswith(p)), None)


def make_question(
    scene: Scene, qtype: str, rng: np.random.Generator, shuffle: bool = True, colour_options: int = 4
) -> Question:
    """A question of ``qtype``; ``shuffle=False`` lists the options in a fixed canonical order;
    ``colour_options``: options of a colour question (2 to all colours)."""
    if qtype not in GENERATORS:
        raise ValueError(f"unknown question type {qtype!r}; choose from {', '.join(QUESTION_TYPES)}")
    if qtype == "colour":
        return colour(scene, rng, shuffle, colour_options)
    return GENERATORS[qtype](scene, rng, shuffle)


def answer_from_scene(question_type: str, question_text: str, scene: Scene, options: list[str]) -> str | None:
    """The correct letter recomputed from the scene, or None if the question became ambiguous.

    Used to confirm that an edit kept the ground truth (the oracle's integrity check).
    """
    vis_full = scene.fully_visible()
    if question_type == "relative_position":
        body = question_text.removeprefix("Where is the ").removesuffix("?")
        a_name, b_name = body.split(" relative to the ")
        a = [o for o in scene.visible(1e-9) if o.name == a_name]
        b = [o for o in scene.visible(1e-9) if o.name == b_name]
        if len(a) != 1 or len(b) != 1:
            return None
        rel = relation(scene.image_box(a[0]), scene.image_box(b[0]))
    elif question_type == "colour":
        cat = question_text.removeprefix("What is the colour of the ").removesuffix("?")
        objs = [o for o in scene.visible(1e-9) if o.category == cat]
        rel = objs[0].colour if len(objs) == 1 else None
    elif question_type == "count":
        cat = question_text.removeprefix("How many ").removesuffix("s are there in the image?")
        if any(0 < scene.visible_fraction(o) < 1.0 and o.category == cat for o in scene.objects):
            return None
        rel = str(sum(o.category == cat for o in vis_full))
    elif question_type == "existence":
        name = question_text.removeprefix("Is there a ").removesuffix(" in the image?")
        rel = "yes" if any(o.name == name for o in scene.visible(1e-9)) else "no"
    else:
        return None
    if rel is None or rel not in options:
        return None
    return letters(len(options))[options.index(rel)]
