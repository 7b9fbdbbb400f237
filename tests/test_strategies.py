"""The strategy taxonomy on hand-built edits of a synthetic scene."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from metrics.strategies import classify_edit, strategy_mix
from world import Background, Scene, SceneObject, draw_object_into, render


def _scene():
    objs = [SceneObject(0, "circle", "red", [20, 20, 44, 44]), SceneObject(1, "square", "blue", [80, 70, 104, 94])]
    return Scene(1, 128, Background("plain", (232, 228, 220), 8, 8), objs, [0.0, 0.0], [128, 128])


def _remove(img: Image.Image, box) -> Image.Image:
    arr = np.asarray(img).copy()
    x0, y0, x1, y1 = box
    arr[y0:y1, x0:x1] = (232, 228, 220)  # background painted over the object
    return Image.fromarray(arr)


def test_each_strategy_on_hand_built_edits():
    clean = render(_scene())
    added, _ = draw_object_into(clean, [90, 10, 114, 34], "triangle", "green")
    removed = _remove(clean, [20, 20, 44, 44])
    replaced, _ = draw_object_into(_remove(clean, [80, 70, 104, 94]), [80, 70, 104, 94], "diamond", "yellow")
    noise = np.random.default_rng(0).integers(-4, 5, np.asarray(clean).shape)
    perturbed = Image.fromarray(np.clip(np.asarray(clean).astype(int) + noise, 0, 255).astype(np.uint8))
    both, _ = draw_object_into(removed, [90, 10, 114, 34], "triangle", "green")
    assert classify_edit(clean, added)["strategy"] == "addition"
    assert classify_edit(clean, removed)["strategy"] == "removal"
    assert classify_edit(clean, replaced)["strategy"] == "replacement"
    p = classify_edit(clean, perturbed)
    assert p["strategy"] == "perturbation" and p["max_diff"] <= 4 and p["changed_fraction"] > 0.5
    assert p["moved_fraction"] == 0.0  # a rough copy moves nothing by more than 16 levels
    washed = np.asarray(clean).astype(int)
    washed[:, :64] += 30  # the left half washed out by 30 levels
    w = classify_edit(clean, Image.fromarray(np.clip(washed, 0, 255).astype(np.uint8)))
    assert w["moved_fraction"] == 0.5  # every left pixel moves >= 23 levels in some channel (255 clips)
    h = classify_edit(clean, both)
    assert h["strategy"] == "hybrid" and sorted(h["regions"]) == ["addition", "removal"]
    assert classify_edit(clean, clean.copy())["strategy"] == "none"


def test_strategy_mix_and_errors():
    mix = strategy_mix(["addition", "addition", "removal", "hybrid"])
    assert mix["addition"] == 0.5 and mix["removal"] == 0.25 and mix["perturbation"] == 0.0
    assert sum(mix.values()) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="differ in size"):
        classify_edit(Image.new("RGB", (4, 4)), Image.new("RGB", (5, 4)))


@pytest.mark.parametrize(
    "label,text,want",
    [
        ("hybrid", "A red ball was added next to the cup.", "addition"),
        ("none", "Only subtle noise changed.", "perturbation"),
        ("hybrid", "The dog was removed.", "removal"),
        ("hybrid", "The cat was replaced by a box.", "replacement"),
        ("hybrid", "A ball was added and the cup removed.", "hybrid"),  # two strategies named: keep the pixels' label
        ("addition", "The dog was removed.", "addition"),  # a clear pixel-level label is kept
        ("hybrid", None, "hybrid"),
    ],
)
def test_a_description_refines_only_ambiguous_labels(label, text, want):
    from metrics.strategies import refine_with_description

    assert refine_with_description(label, text) == want
