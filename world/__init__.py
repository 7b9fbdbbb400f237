"""The synthetic scene world: seeded scenes, exact rendering, questions with exact answers.

It is both the default data source and the measuring instrument of the project, so it is exact
and deterministic under a seed. It knows no model (DESIGN.md, "Imports run one way").
"""

from world.questions import (
    QUESTION_TYPES,
    NoQuestion,
    Question,
    answer_from_scene,
    letters,
    make_question,
    matches,
    parse_expression,
    question_type_of,
    relation,
)
from world.render import add_object, background_pixels, draw_object_into, draw_shape, object_mask, render, square_in_box
from world.scene import CATEGORIES, COLOURS, Background, Scene, SceneObject, WorldConfig, generate_world

__all__ = [
    "CATEGORIES",
    "COLOURS",
    "QUESTION_TYPES",
    "Background",
    "NoQuestion",
    "Question",
    "Scene",
    "SceneObject",
    "WorldConfig",
    "add_object",
    "answer_from_scene",
    "background_pixels",
    "draw_object_into",
    "draw_shape",
    "generate_world",
    "letters",
    "make_question",
    "matches",
    "parse_expression",
    "question_type_of",
    "relation",
    "object_mask",
    "render",
    "square_in_box",
]
