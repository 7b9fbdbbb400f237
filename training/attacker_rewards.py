"""The attacker's reward (METHOD.md, "Attacker reward"): integrity x efficacy, every part kept.

- Integrity: s_j = SSIM of target box j between the clean and the edited image; I = 1 if
  min_j s_j >= tau (0.9) — and, optionally, the global SSIM is >= a floor (against repainting the
  whole image) — else 0.
- Efficacy: the frozen defender is queried K times (3); c = wrong answers before the first right
  one; E = c / K ("consecutive reasoning failures").
- R = I * E; an invalid edit scores ``invalid_penalty`` (0 by default) instead.

Rewards are callables with one signature, ``(clean, edited, sample) -> dict`` holding at least
``reward``, and are combined by a weight dict (flow_grpo's convention).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image

from metrics import localized_ssim, region_ssim


def consecutive_failures(correct: list[bool]) -> int:
    """Wrong answers before the first right one."""
    c = 0
    for ok in correct:
        if ok:
            break
        c += 1
    return c


@dataclass
class AttackSample:
    target_boxes: list[list[float]]
    defender_correct: list[bool]  # the frozen defender's K answers on the edited image, right or wrong


def integrity(clean: Image.Image, edited: Image.Image, sample: AttackSample, tau: float = 0.9,
              global_floor: float | None = None) -> dict:
    ssims = [localized_ssim(clean, edited, b) for b in sample.target_boxes]
    s_min = min(ssims) if ssims else 1.0
    glob = region_ssim(np.asarray(clean), np.asarray(edited)) if global_floor is not None else None
    ok = s_min >= tau and (glob is None or glob >= global_floor)
    return {"integrity": float(ok), "target_ssim_min": s_min, "global_ssim": glob}


def efficacy(sample: AttackSample) -> dict:
    k = len(sample.defender_correct)
    c = consecutive_failures(sample.defender_correct)
    return {"efficacy": c / k if k else 0.0, "consecutive_failures": c, "queries": k}


def attacker_reward(clean: Image.Image, edited: Image.Image, sample: AttackSample, tau: float = 0.9,
                    global_floor: float | None = None, invalid_penalty: float = 0.0) -> dict:
    parts = {**integrity(clean, edited, sample, tau, global_floor), **efficacy(sample)}
    parts["reward"] = parts["efficacy"] if parts["integrity"] else invalid_penalty
    return parts


RewardFn = Callable[[Image.Image, Image.Image, AttackSample], dict]


def combine(fns: dict[str, RewardFn], weights: dict[str, float], clean, edited, sample) -> dict:
    """Weighted sum of reward callables; every component kept under ``name/part``."""
    out, total = {}, 0.0
    for name, fn in fns.items():
        parts = fn(clean, edited, sample)
        total += weights.get(name, 1.0) * parts["reward"]
        out.update({f"{name}/{k}": v for k, v in parts.items()})
    out["reward"] = total
    return out
