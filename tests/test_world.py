"""The synthetic world: exact, deterministic, and consistent with its own ground truth."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from PIL import Image

from world import (
    Background,
    Scene,
    SceneObject,
    answer_from_scene,
    draw_object_into,
    generate_world,
    make_question,
    question_type_of,
    relation,
    render,
)
from world.questions import NoQuestion


def _digest(img: Image.Image) -> str:
    return hashlib.sha256(np.asarray(img).tobytes()).hexdigest()


def test_same_seed_same_scene_and_pixels():
    a, b = generate_world(123), generate_world(123)
    assert a.to_dict() == b.to_dict()
    assert _digest(render(a)) == _digest(render(b))
    assert _digest(render(generate_world(124))) != _digest(render(a))


def test_scene_json_round_trip():
    s = generate_world(5)
    assert Scene.from_dict(s.to_dict()).to_dict() == s.to_dict()


def test_outpainting_window_contains_the_source_exactly():
    """Rendering a larger window around the scene reproduces the source pixels in its centre."""
    s = generate_world(7)
    src = np.asarray(render(s))
    big = s.copy()
    big.origin = [-40.0, -24.0]
    big.size = [s.size[0] + 80, s.size[1] + 48]
    out = np.asarray(render(big))
    assert np.array_equal(out[24 : 24 + s.size[1], 40 : 40 + s.size[0]], src)


def test_draw_object_into_touches_only_the_box():
    s = generate_world(9)
    img = render(s)
    box = [10.5, 20.0, 40.0, 37.0]
    out, drawn = draw_object_into(img, box, "circle", "red")
    a, b = np.asarray(img), np.asarray(out)
    changed = np.argwhere(np.any(a != b, axis=-1))
    assert len(changed) > 50
    ys, xs = changed[:, 0], changed[:, 1]
    assert xs.min() >= 10 and xs.max() < 40 and ys.min() >= 20 and ys.max() < 37
    # The largest centred square: side floor(min(29.5, 17)) = 17, x0 = floor(25.25 - 8.5) = 16.
    assert drawn == [16, 20, 33, 37]


def test_relation_hand_cases():
    b = [40, 40, 50, 50]
    assert relation([10, 40, 20, 50], b) == "left"
    assert relation([70, 42, 80, 52], b) == "right"
    assert relation([40, 5, 50, 15], b) == "above"
    assert relation([41, 80, 51, 90], b) == "below"
    assert relation([60, 60, 70, 70], b) is None  # diagonal: no dominant axis, never asked


def _hand_scene() -> Scene:
    objs = [
        SceneObject(0, "circle", "red", [10, 60, 26, 76]),
        SceneObject(1, "square", "blue", [80, 60, 96, 76]),
        SceneObject(2, "triangle", "green", [50, 10, 66, 26]),
        SceneObject(3, "circle", "yellow", [200, 60, 216, 76]),  # outside the 128x128 window
    ]
    return Scene(1, 128, Background("plain", (232, 228, 220), 8, 8), objs, [0.0, 0.0], [128, 128])


def test_questions_follow_from_the_scene():
    s = _hand_scene()
    rng = np.random.default_rng(0)
    for qtype in ("relative_position", "colour", "count", "existence"):
        for _ in range(5):
            q = make_question(s, qtype, rng)
            assert answer_from_scene(q.type, q.text, s, q.options) == q.answer
            assert question_type_of(q.text) == qtype  # the judge reads the type from the text alone
    assert question_type_of("Which fruit is on the table?") is None
    q = make_question(s, "count", np.random.default_rng(1))
    if q.text == "How many circles are there in the image?":
        assert q.options[ord(q.answer) - 65] == "1"  # the yellow circle is outside the window


def test_generated_questions_are_answerable_and_balanced():
    counts = {}
    for seed in range(300):
        s = generate_world(seed)
        try:
            q = make_question(s, "relative_position", np.random.default_rng(seed))
        except NoQuestion:
            continue
        assert answer_from_scene(q.type, q.text, s, q.options) == q.answer
        counts[q.answer] = counts.get(q.answer, 0) + 1
    n = sum(counts.values())
    assert n > 200
    assert all(abs(c / n - 0.25) < 0.08 for c in counts.values()), counts  # shuffled options


def test_unknown_question_type_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown question type"):
        make_question(generate_world(1), "color", np.random.default_rng(0))


def test_fixed_option_order_and_colour_options():
    """``shuffle=False``: options in the world's canonical order (never "correct first"), so with
    all six colours a colour question's letter names the same colour every time."""
    from world import COLOURS
    from world.questions import RELATIONS

    answers, shuffled_orders = set(), set()
    for seed in range(40):
        scene = generate_world(seed)
        try:
            q = make_question(scene, "colour", np.random.default_rng(seed), shuffle=False, colour_options=6)
            r = make_question(scene, "relative_position", np.random.default_rng(seed), shuffle=False)
            s = make_question(scene, "relative_position", np.random.default_rng(seed))
        except NoQuestion:
            continue
        assert q.options == list(COLOURS) and r.options == list(RELATIONS)
        colour = scene.find(q.target_ids[0]).colour
        assert q.answer == "ABCDEF"[list(COLOURS).index(colour)]
        assert answer_from_scene("colour", q.text, scene, q.options) == q.answer
        answers.add(q.answer)
        shuffled_orders.add(tuple(s.options))
    assert len(answers) >= 3  # the answer is not one fixed letter
    assert len(shuffled_orders) >= 3  # the default still shuffles
    four = make_question(generate_world(3), "count", np.random.default_rng(0), shuffle=False)
    assert four.options == sorted(four.options, key=int)
