"""The attacker's reward (METHOD.md, "Attacker reward"): integrity x efficacy, every part kept.

- Integrity: s_j = SSIM of target box j between the clean and the edited image; I = 1 if
  min_j s_j >= tau (0.9) — and, optionally, the global SSIM is >= a floor (against repainting the
  whole image) — else 0.
- Efficacy: the frozen defender is queried K times (3); c = wrong answers before the first right
  one; E = c / K ("consecutive reasoning failures").
- R = I * E; an invalid edit scores ``invalid_penalty`` (0 by default) instead, never more than
  the lowest valid reward (dense efficacy goes down to -1, so there the penalty is at most -1);
  or, with ``invalid_score="group"``, just below the lowest valid edit of the same call (one
  Flow-GRPO group), so a broken edit ranks last without taking the group's reward spread; or, with
  ``"skip"``, NaN: no advantage at all, the valid edits ranked among themselves; or, with ``"dual"``,
  the valid edits' mean minus a price that dual ascent sets to hold integrity at a target rate.
- Dense efficacy (``efficacy="dense"``, ours): E = P(right letter | clean) - P(right letter |
  edited) from the defender's scoring forwards. K sampled answers of a defender that errs on a
  third of clean images mostly measure its own noise; the probability drop measures what the edit
  did, on every edit, and the clean term is the per-item baseline.

Rewards used in training are batch callables with one signature,
``(cleans, editeds, items) -> list[dict]`` (each dict holds at least ``reward``; every other key
is kept per sample), combined by a weight dict (flow_grpo's convention). Batches let the frozen
defender answer a whole group at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from PIL import Image

from config.training import EFFICACY_KINDS, INVALID_SCORES
from metrics import localized_ssim, region_ssim
from models.roles import seeds_each_row


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
    target_mask: Image.Image | None = None  # the targets' own pixels (AttackItem.target_mask)


def targets_view(clean: Image.Image, edited: Image.Image, mask: Image.Image | None) -> Image.Image:
    """What the integrity gate compares with the clean image: the edit itself, or with a target
    mask (``attacker.keep_target_shapes``) the edit's pixels on the targets' shapes and the clean
    ones elsewhere — a target is its object, and the background in the corners of its box is scene
    the attacker may change, as it may outside the box (gated on the box, that background would
    make the attacker trade integrity against efficacy again)."""
    if mask is None:
        return edited
    keep = (np.asarray(mask) > 0)[..., None]
    view = np.where(keep, np.asarray(edited.convert("RGB")), np.asarray(clean.convert("RGB")))
    return Image.fromarray(view)


def integrity(
    clean: Image.Image, edited: Image.Image, sample: AttackSample, tau: float = 0.9, global_floor: float | None = None
) -> dict:
    view = targets_view(clean, edited, sample.target_mask)
    ssims = [localized_ssim(clean, view, b) for b in sample.target_boxes]
    s_min = min(ssims) if ssims else 1.0
    glob = region_ssim(np.asarray(clean), np.asarray(edited)) if global_floor is not None else None
    ok = s_min >= tau and (glob is None or glob >= global_floor)
    return {"integrity": float(ok), "target_ssim_min": s_min, "global_ssim": glob}


def efficacy(sample: AttackSample) -> dict:
    k = len(sample.defender_correct)
    c = consecutive_failures(sample.defender_correct)
    return {"efficacy": c / k if k else 0.0, "consecutive_failures": c, "queries": k}


def attacker_reward(
    clean: Image.Image,
    edited: Image.Image,
    sample: AttackSample,
    tau: float = 0.9,
    global_floor: float | None = None,
    invalid_penalty: float = 0.0,
) -> dict:
    parts = {**integrity(clean, edited, sample, tau, global_floor), **efficacy(sample)}
    parts["reward"] = parts["efficacy"] if parts["integrity"] else invalid_penalty
    return parts


@dataclass
class AttackItem:
    """One thing to attack: an image, the edit instruction, and the question whose targets must survive."""

    id: str
    image: Image.Image
    instruction: str
    target_boxes: list[list[float]]
    prompt: str = ""  # the defender's MCQ prompt
    answer: str = ""
    num_options: int = 0
    target_names: list[str] = field(default_factory=list)
    question: str = ""
    options: list[str] = field(default_factory=list)
    # 'L' mask at the image's size of the pixels keep_targets gives back (attacker.keep_target_shapes:
    # the targets' own shapes); None: their boxes
    target_mask: Image.Image | None = None


BatchReward = Callable[[list[Image.Image], list[Image.Image], list[AttackItem]], list[dict]]


class IntegrityEfficacy:
    """R = I x E with a frozen defender: it answers every edited image of the batch K times."""

    def __init__(
        self,
        defender,
        tau: float = 0.9,
        queries: int = 3,
        temperature: float = 1.0,
        global_floor: float | None = None,
        invalid_penalty: float = 0.0,
        efficacy: str = "sampled",
        invalid_score: str = "fixed",
        integrity_target: float = 0.5,
        dual_lr: float = 0.05,
    ):
        if efficacy not in EFFICACY_KINDS:
            raise ValueError(f"efficacy must be one of {EFFICACY_KINDS}, not {efficacy!r}")
        if invalid_score not in INVALID_SCORES:
            raise ValueError(f"invalid_score must be one of {INVALID_SCORES}, not {invalid_score!r}")
        if efficacy == "dense" and not hasattr(defender, "answer_probability"):
            raise ValueError(
                f"dense efficacy needs a defender that scores answers ({type(defender).__name__} does not): "
                "use a Qwen2.5-VL defender, or attacker.rl.reward.efficacy=sampled"
            )
        self.defender, self.tau, self.queries, self.temperature = defender, tau, queries, temperature
        self.global_floor = global_floor or None
        self.invalid_penalty, self.efficacy, self.invalid_score = invalid_penalty, efficacy, invalid_score
        self.integrity_target, self.dual_lr = integrity_target, dual_lr
        self.integrity_price = 0.0  # lambda of invalid_score 'dual', in reward units (state_dict)

    def state_dict(self) -> dict:
        """What a resumed phase needs to score as the interrupted one would (the trainer saves it)."""
        return {"integrity_price": self.integrity_price}

    def load_state_dict(self, state: dict) -> None:
        self.integrity_price = float(state["integrity_price"])

    def answers(self, editeds: list[Image.Image], items: list[AttackItem]) -> list[list[bool]]:
        """Per image, whether each of the K sampled answers (query k under seed k) is right. Each
        image is answered as it would be alone: a defender that seeds each row
        (``generate(..., seeds=)``) answers the whole batch in one call per query, any other one
        image at a time. In a batch drawing from one generator a row's answers would depend on the
        rows beside it, so an item's efficacy, and its baseline (``unedited_efficacy``), would
        change with the shard or the kept set it sits in."""
        from models.mcq import extract_choice

        per_row = seeds_each_row(self.defender)
        right = [[] for _ in items]
        for k in range(self.queries):
            if per_row:
                texts = self.defender.generate(
                    editeds, [it.prompt for it in items], temperature=self.temperature, seed=k, seeds=[k] * len(items)
                )
            else:
                texts = [
                    self.defender.generate([im], [it.prompt], temperature=self.temperature, seed=k)[0]
                    for im, it in zip(editeds, items)
                ]
            for j, (t, it) in enumerate(zip(texts, items)):
                right[j].append(extract_choice(t, it.num_options).letter == it.answer)
        return right

    def unedited_efficacy(self, images: list[Image.Image], items: list[AttackItem]) -> list[float]:
        """E of the images as they are (the same K queries and seeds, each image as if alone): what
        an attack gets for free on the items this defender already fails — the baseline an
        attack's efficacy is read against."""
        return [efficacy(AttackSample([], r))["efficacy"] for r in self.answers(images, items)]

    def right_probability(self, images: list[Image.Image], items: list[AttackItem]) -> list[float]:
        """P(right letter) per image; an image object repeated in the batch (a group's clean
        image) is scored once."""
        first: dict[int, int] = {}
        for j, im in enumerate(images):
            first.setdefault(id(im), j)
        rows = list(first.values())
        p = self.defender.answer_probability(
            [images[j] for j in rows],
            [items[j].prompt for j in rows],
            [items[j].answer for j in rows],
            [items[j].num_options for j in rows],
        )
        by_image = {id(images[j]): v for j, v in zip(rows, p)}
        return [by_image[id(im)] for im in images]

    def __call__(self, cleans, editeds, items) -> list[dict]:
        out = self._score(cleans, editeds, items)
        if self.invalid_score == "group":
            return rank_invalid_last(out)
        if self.invalid_score == "skip":  # NaN: no advantage (rl/flow_grpo.group_advantages)
            return [r if r["integrity"] else {**r, "reward": float("nan")} for r in out]
        if self.invalid_score == "dual":
            return self._price_invalid(out)
        return out

    def _price_invalid(self, rows: list[dict]) -> list[dict]:
        """invalid_score 'dual': a broken edit scores the mean of the group's valid rewards minus
        the integrity price lambda, which dual ascent moves after every group towards the level that
        holds the integrity rate at its target: lambda <- max(0, lambda + dual_lr * (target - rate))
        (a Lagrangian relaxation of "maximize efficacy subject to integrity >= target", as in
        reward-constrained policy optimization, Tessler et al. 2019). At lambda = 0 breaking is
        neutral; 'group' (a fixed price just below the worst valid edit) traded efficacy for
        integrity, 'skip' (no price) integrity for efficacy (RESULTS.md)."""
        price = self.integrity_price
        valid = [r["reward"] for r in rows if r["integrity"]]
        rate = len(valid) / len(rows) if rows else 1.0
        self.integrity_price = max(0.0, price + self.dual_lr * (self.integrity_target - rate))
        if not valid or len(valid) == len(rows):
            return [{**r, "integrity_price": price} for r in rows]
        floor = float(np.mean(valid)) - price
        return [{**r, "integrity_price": price, **({} if r["integrity"] else {"reward": floor})} for r in rows]

    def _score(self, cleans, editeds, items) -> list[dict]:
        if self.efficacy == "dense":
            p_clean, p_edit = self.right_probability(cleans, items), self.right_probability(editeds, items)
            out = []
            for c, e, it, pc, pe in zip(cleans, editeds, items, p_clean, p_edit):
                parts = integrity(c, e, AttackSample(it.target_boxes, [], it.target_mask), self.tau, self.global_floor)
                parts.update(efficacy=pc - pe, p_right_clean=pc, p_right_edited=pe)
                # E reaches -1 here, so a penalty of 0 would pay a broken edit more than a valid one
                # that helps the defender, and the phase learns to break the gate (RESULTS.md).
                parts["reward"] = parts["efficacy"] if parts["integrity"] else min(self.invalid_penalty, -1.0)
                out.append(parts)
            return out
        right = self.answers(editeds, items)
        return [
            attacker_reward(
                c,
                e,
                AttackSample(it.target_boxes, r, it.target_mask),
                self.tau,
                self.global_floor,
                self.invalid_penalty,
            )
            for c, e, it, r in zip(cleans, editeds, items, right)
        ]


GROUP_MARGIN = 0.05  # an invalid edit's least distance below the lowest valid one (rank_invalid_last)


def rank_invalid_last(rows: list[dict]) -> list[dict]:
    """Score the rows that fail integrity just below the lowest valid reward among ``rows`` (one
    group): min - max(std, GROUP_MARGIN) of the valid rewards. Group-normalized advantages then
    still put every broken edit last, while the valid edits keep their spread; a fixed penalty far
    below them (-1 against dense efficacies of +/-0.1-0.3) makes one broken edit most of a group's
    variance. With no valid row the rewards are left as they are (one value: no advantage)."""
    valid = [r["reward"] for r in rows if r["integrity"]]
    if not valid or len(valid) == len(rows):
        return rows
    floor = min(valid) - max(float(np.std(valid)), GROUP_MARGIN)
    return [r if r["integrity"] else {**r, "reward": floor} for r in rows]


def box_contrast(cleans, editeds, items) -> list[dict]:
    """Mean brightness inside the first target box minus outside it, in [-1, 1]: a verifiable
    reward for learnability checks (the edit must brighten the box and only the box)."""
    out = []
    for e, it in zip(editeds, items):
        g = np.asarray(e.convert("L"), dtype=np.float64) / 255.0
        x0, y0, x1, y1 = (int(round(v)) for v in it.target_boxes[0])
        inside = np.zeros(g.shape, dtype=bool)
        inside[y0:y1, x0:x1] = True
        b_in, b_out = float(g[inside].mean()), float(g[~inside].mean())
        out.append({"reward": b_in - b_out, "brightness_in": b_in, "brightness_out": b_out})
    return out


def combine(fns: dict[str, BatchReward], weights: dict[str, float], cleans, editeds, items) -> list[dict]:
    """Weighted sum of batch reward callables; every component kept per sample under ``name/part``."""
    rows = [{} for _ in items]
    totals = [0.0] * len(items)
    for name, fn in fns.items():
        w = weights.get(name, 1.0)
        for j, parts in enumerate(fn(cleans, editeds, items)):
            totals[j] += w * parts["reward"]
            rows[j].update({f"{name}/{k}": v for k, v in parts.items()})
    for r, t in zip(rows, totals):
        r["reward"] = t
    return rows
