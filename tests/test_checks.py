"""Box transforms, the box and prompt checks, localized SSIM and MCQ extraction on hand-built cases."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from metrics import expand_box, iou, localized_ssim, transform_box
from metrics.ssim import region_ssim
from models.mcq import extract_choice, format_prompt, mcq_reward, parse_prompt
from stages.checks import box_check, prompt_check
from stages.extend import canvas_geometry


# ------------------------------------------------------------------ boxes
def test_transform_box_offset_then_scale():
    assert transform_box([10, 20, 30, 40], (32, 16)) == [42, 36, 62, 56]
    assert transform_box([10, 20, 30, 40], (32, 16), 0.5) == [21, 18, 31, 28]


def test_canvas_geometry():
    size, offset, resize = canvas_geometry(128, 96, 1.5, 4_000_000)
    assert size == (192, 144) and offset == (32, 24) and resize == 1.0
    size, offset, resize = canvas_geometry(2000, 2000, 2.0, 4_000_000)
    assert size == (4000, 4000) and offset == (1000, 1000) and resize == pytest.approx(0.5)


def test_iou_hand_values():
    assert iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(50 / 150)
    assert iou([0, 0, 10, 10], [10, 0, 20, 10]) == 0.0
    assert expand_box([5, 5, 10, 10], 2) == [3, 3, 12, 12]


# -------------------------------------------------------------- box check
@pytest.mark.parametrize(
    "box,ok,why",
    [
        ([60, 60, 80, 80], True, ""),
        ([-2, 60, 18, 80], False, "leaves"),
        ([60, 60, 80, 101], False, "leaves"),
        ([60, 60, 62, 62], False, "< 0.04"),
        ([10, 10, 60, 60], False, "> 0.35"),
        ([14, 14, 30, 30], False, "overlaps target"),  # 2 px from the target: inside the 4 px margin
        ([15, 40, 35, 60], False, "overlaps target"),
        ([50, 50, 50, 70], False, "degenerate"),
    ],
)
def test_box_check(box, ok, why):
    got, reason = box_check(box, 100, 100, [[20, 20, 40, 40]], margin=4, min_frac=0.04, max_frac=0.35)
    assert got is ok
    assert why in reason


def test_box_check_margin_edge():
    target = [[20, 20, 40, 40]]
    assert box_check([44, 20, 60, 36], 100, 100, target, 4, 0.04, 0.35)[0] is True  # exactly at the margin
    assert box_check([43, 20, 60, 36], 100, 100, target, 4, 0.04, 0.35)[0] is False


# ----------------------------------------------------------- prompt check
@pytest.mark.parametrize(
    "description,targets,ok",
    [
        ("blue circle", ["red circle", "green square"], True),
        ("red triangle", ["red circle"], True),
        ("red circle", ["red circle"], False),
        ("a circle", ["red circle"], False),
        ("two Red Circles", ["red circle"], False),
        ("blue circle", ["circle"], False),  # counting question: any circle is a target
        ("blue cell phone", ["red cell phone"], True),
        ("cell phone", ["red cell phone"], False),
        ("phone", ["cell phone"], True),  # only the full category phrase counts
        ("", ["circle"], False),
    ],
)
def test_prompt_check(description, targets, ok):
    assert prompt_check(description, targets)[0] is ok


# -------------------------------------------------------------------- SSIM
def test_localized_ssim_hand_images():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
    b = a.copy()
    b[30:40, 30:40] = 0  # change only the bottom-right corner
    assert localized_ssim(a, b, [0, 0, 20, 20]) == 1.0
    assert localized_ssim(a, b, [30, 30, 40, 40]) < 0.1
    mid = localized_ssim(a, b, [20, 20, 40, 40])
    assert 0.1 < mid < 0.9


def test_ssim_constant_shift_matches_formula():
    # Two constant patches: SSIM = luminance term (2 mu_x mu_y + C1) / (mu_x^2 + mu_y^2 + C1).
    a = np.full((9, 9), 100, dtype=np.uint8)
    b = np.full((9, 9), 120, dtype=np.uint8)
    c1 = (0.01 * 255) ** 2
    expected = (2 * 100 * 120 + c1) / (100**2 + 120**2 + c1)
    assert region_ssim(a, b) == pytest.approx(expected, rel=1e-6)


def test_ssim_tiny_boxes_fall_back_to_equality():
    a = np.zeros((2, 2, 3), dtype=np.uint8)
    assert region_ssim(a, a.copy()) == 1.0
    b = a.copy()
    b[0, 0, 0] = 1
    assert region_ssim(a, b) == 0.0


def test_localized_ssim_size_mismatch_is_an_error():
    with pytest.raises(ValueError, match="differ in size"):
        localized_ssim(Image.new("RGB", (4, 4)), Image.new("RGB", (5, 4)), [0, 0, 2, 2])


# --------------------------------------------------------- MCQ extraction
@pytest.mark.parametrize(
    "text,letter,strict,reward",
    [
        ("\\boxed{B}", "B", True, 1.0),
        ("The answer is \\boxed{B}.", "B", True, 1.0),
        ("\\boxed{b}", "B", False, 0.8),
        ("\\boxed{(B)}", "B", False, 0.8),
        ("\\boxed[B]", "B", False, 0.8),
        ("\\boxed{A}", "A", True, 0.0),
        ("B", None, False, 0.0),
        ("\\boxed{B} or maybe \\boxed{C}", None, False, 0.0),
        ("\\boxed{B} ... final: \\boxed{B}", "B", False, 0.8),
        ("\\boxed{E}", None, False, 0.0),  # not among 4 options
        ("", None, False, 0.0),
    ],
)
def test_extract_and_reward(text, letter, strict, reward):
    ext = extract_choice(text, 4)
    assert (ext.letter, ext.strict) == (letter, strict)
    assert mcq_reward(text, "B", 4) == pytest.approx(reward)


@pytest.mark.parametrize(
    "text",
    [
        "\\boxed{" + " " * 4096 + "B" + " " * 4096 + "x",  # the n^3 case of a backtracking lenient pattern
        "\\boxed{ ( " * 700 + "B",
        "\\boxed" + " " * 4096 + "{" + " " * 4096,
    ],
)
def test_a_degenerate_4096_token_rollout_is_scored_in_milliseconds(text):
    """Rewards are scored on every rollout: a degenerate one (spaces around a letter, no closing
    bracket) must not stall the trainer. 10 ms is 25-80x what the linear pattern needs here; the
    test passes on the first of five tries under it, so a test worker preempted on a loaded machine
    does not fail it, while a backtracking pattern is slow on every try."""
    import time

    def timed():
        t0 = time.perf_counter()
        out = extract_choice(text, 4), mcq_reward(text, "B", 4)
        return time.perf_counter() - t0, out

    for _ in range(5):  # a try over a second is no preemption: stop there, not after five of them
        seconds, (ext, reward) = timed()
        if seconds < 0.01 or seconds > 1.0:
            break
    assert seconds < 0.01
    assert (ext.letter, reward) == (None, 0.0)
    assert extract_choice(" " * 9 + "\\boxed{ ( b ) }" + " " * 9, 4).letter == "B"  # still lenient


def test_prompt_round_trip():
    p = format_prompt("Where is the red circle relative to the blue square?", ["left", "right", "above", "below"])
    assert p.startswith("Please answer the following multiple-choice question.")
    assert "(C) above" in p and p.endswith("where X is the letter of your choice.")
    assert parse_prompt(p) == (
        "Where is the red circle relative to the blue square?",
        ["left", "right", "above", "below"],
    )
