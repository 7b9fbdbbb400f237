"""The attacker: tiny Qwen-Image-Edit editor, SDE sampler, Flow-GRPO trainer, rewards."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from config import AttackerTrainConfig, FlowGrpoConfig
from metrics import region_ssim
from rl.flow_grpo import gaussian_kl
from rl.flow_sampler import sample, sde_window, step_log_prob
from training.attacker import AttackerTrainer, EditPair, Placement
from training.attacker_rewards import AttackItem, IntegrityEfficacy, box_contrast


def _editor(resolution: int = 32):
    from models.editor import QwenImageEditor

    return QwenImageEditor.tiny(seed=0, resolution=resolution)


def _items(n: int = 4, size: int = 32) -> list[AttackItem]:
    rng = np.random.RandomState(0)
    return [
        AttackItem(
            f"i{i}",
            Image.fromarray((rng.rand(size, size, 3) * 120 + 60).astype("uint8")),
            "brighten the box",
            [[8, 8, 24, 24]],
        )
        for i in range(n)
    ]


def _cfg(**kw) -> AttackerTrainConfig:
    fg = kw.pop("flow_grpo", {})
    base = dict(mode="grpo", steps=2, groups_per_step=2, lr=3e-2, weight_decay=0.0, lora_rank=4, lora_alpha=8)
    base.update(kw)
    return AttackerTrainConfig(
        **base, flow_grpo=FlowGrpoConfig(**{"group_size": 4, "sampling_steps": 4, "noise_level": 1.0, **fg})
    )


def test_a_zero_sampler_is_the_pipeline_sampler_bit_for_bit(monkeypatch):
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit as qie

    ed = _editor()
    img = _items(1)[0].image
    cond = ed.condition([img], ["make it red"])
    x = ed.noise(cond, torch.Generator().manual_seed(3))
    ours = sample(ed, cond, 5, 0.0, x=x).final
    # The pipeline resizes to ~1024^2 by itself; pin its target to our edit size for the comparison.
    monkeypatch.setattr(qie, "calculate_dimensions", lambda area, ratio: (cond.size[0], cond.size[1], None))
    ref = ed.pipe(
        image=img,
        prompt="make it red",
        num_inference_steps=5,
        true_cfg_scale=1.0,
        latents=x.clone(),
        height=cond.size[1],
        width=cond.size[0],
        output_type="latent",
    ).images
    assert torch.equal(ours, ref)


def test_kontext_a_zero_sampler_is_the_pipeline_sampler_and_its_lora_trains():
    from models.editor import FluxKontextEditor

    ed = FluxKontextEditor.tiny(seed=0, resolution=32)
    img = _items(1)[0].image
    cond = ed.condition([img], ["make it red"])
    x = ed.noise(cond, torch.Generator().manual_seed(3))
    ours = sample(ed, cond, 4, 0.0, x=x).final
    w, h = cond.size  # max_area and _auto_resize pin the pipeline to our size (its default is 1024^2)
    ref = ed.pipe(
        image=img,
        prompt="make it red",
        num_inference_steps=4,
        guidance_scale=2.5,
        latents=x.clone(),
        height=h,
        width=w,
        max_area=w * h,
        _auto_resize=False,
        max_sequence_length=ed.max_sequence_length,
        output_type="latent",
    ).images
    assert torch.equal(ours, ref)
    tr = AttackerTrainer(ed, _cfg(steps=2), items=_items(), rewards={"contrast": box_contrast})
    before = {k: v.clone() for k, v in ed.lora_state().items()}
    tr.train()
    after = ed.lora_state()
    assert tr.metrics[0]["ratio_max"] == 1.0 and not [k for k in before if torch.equal(before[k], after[k])]


def test_sde_window_is_early_and_consecutive():
    assert sde_window(10, 0) == list(range(9))  # every step but the last
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        w = sde_window(10, 3, g)
        assert len(w) == 3 and w == list(range(w[0], w[0] + 3)) and w[0] <= 2  # inside the high-noise half


def test_first_update_is_on_policy_ratio_one_kl_zero():
    ed = _editor()
    ed.add_lora(4, 8)
    cond = ed.condition([_items(1)[0].image], ["x"]).repeat(4)
    traj = sample(ed, cond, 4, 1.0, generator=torch.Generator().manual_seed(0))
    assert traj.sde_steps == [0, 1, 2] and (traj.log_probs[:, 3] == 0).all()
    for i in traj.sde_steps:
        out = step_log_prob(ed, traj, i, cond, 1.0)
        assert torch.equal(torch.exp(out.log_prob.detach() - traj.log_probs[:, i]), torch.ones(4))
        with torch.no_grad(), ed.reference():
            ref = step_log_prob(ed, traj, i, cond, 1.0)
        assert torch.equal(gaussian_kl(out.mean, ref.mean, out.std.expand_as(out.mean)), torch.zeros(4))


def test_lora_parameters_all_change_and_the_reference_stays():
    ed = _editor()
    tr = AttackerTrainer(ed, _cfg(steps=2), items=_items(), rewards={"contrast": box_contrast})
    before = {k: v.clone() for k, v in ed.lora_state().items()}
    base = {n: p.detach().clone() for n, p in ed.transformer.named_parameters() if "lora_" not in n}
    tr.train()
    after = ed.lora_state()
    # LoRA's B starts at 0, so A gets its first gradient on step 2 (weight decay 0: only gradients move them).
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert not unchanged, unchanged
    assert all(torch.equal(p, base[n]) for n, p in ed.transformer.named_parameters() if "lora_" not in n)
    assert tr.metrics[0]["ratio_max"] == 1.0 and tr.metrics[0]["clip_fraction"] == 0.0
    assert len(tr.samples) == 2 * 2 * 4 and {"reward", "contrast/brightness_in"} <= set(tr.samples[0])


def test_unscored_edits_give_no_gradient():
    """invalid_score 'skip' marks a broken edit's reward NaN: every edit unscored leaves the LoRA
    exactly as it was (advantage 0, no NaN in the weights); half unscored still trains, and the
    logged reward is the mean of the scored ones."""

    def none_scored(cleans, editeds, items):
        return [{**r, "reward": float("nan")} for r in box_contrast(cleans, editeds, items)]

    def every_other(cleans, editeds, items):
        return [
            {**r, "reward": float("nan")} if j % 2 else r for j, r in enumerate(box_contrast(cleans, editeds, items))
        ]

    ed = _editor()
    tr = AttackerTrainer(ed, _cfg(steps=2), items=_items(), rewards={"contrast": none_scored})
    before = {k: v.clone() for k, v in ed.lora_state().items()}
    tr.train()
    assert all(torch.equal(before[k], v) for k, v in ed.lora_state().items())
    ed = _editor()
    tr = AttackerTrainer(ed, _cfg(steps=2), items=_items(), rewards={"contrast": every_other})
    before = {k: v.clone() for k, v in ed.lora_state().items()}
    tr.train()
    after = ed.lora_state()
    assert all(torch.isfinite(v).all() for v in after.values())
    assert [k for k in before if not torch.equal(before[k], after[k])]
    first = [r["reward"] for r in tr.samples if r["step"] == 1]
    assert sum(math.isnan(v) for v in first) == len(first) // 2
    assert tr.metrics[0]["reward"] == pytest.approx(float(np.nanmean(first)), rel=1e-5)


def test_resume_reproduces_the_next_step(tmp_path):
    class Priced:  # a reward with state (as invalid_score 'dual'): its price moves on every call
        def __init__(self):
            self.price = 0.0

        def __call__(self, cleans, editeds, items):
            self.price += 0.1
            return [
                {**r, "reward": r["reward"] + self.price * j}
                for j, r in enumerate(box_contrast(cleans, editeds, items))
            ]

        def state_dict(self):
            return {"price": self.price}

        def load_state_dict(self, st):
            self.price = st["price"]

    cfg = _cfg(steps=3)
    a = AttackerTrainer(_editor(), cfg, items=_items(), rewards={"contrast": Priced()})
    a.train(steps=2)
    a.save(tmp_path / "ck")
    a.train()
    b = AttackerTrainer(_editor(), cfg, items=_items(), rewards={"contrast": Priced()}, resume_from=tmp_path / "ck")
    assert b.step == 2 and b.rewards["contrast"].price == pytest.approx(0.4)  # 2 steps x 2 groups
    b.train()
    drop = ("seconds", "sample_seconds", "reward_seconds", "update_seconds")
    assert {k: v for k, v in b.metrics[-1].items() if k not in drop} == {
        k: v for k, v in a.metrics[-1].items() if k not in drop
    }
    sa, sb = a.editor.lora_state(), b.editor.lora_state()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_cold_start_fits_the_pairs():
    ed = _editor()
    items = _items(2)
    pairs = [EditPair(it.image, Image.fromarray(255 - np.asarray(it.image)), "invert the colours") for it in items]
    tr = AttackerTrainer(ed, _cfg(mode="sft", steps=30, sft_batch=2, lr=1e-2), pairs=pairs)
    tr.train()
    first, last = np.mean([r["loss"] for r in tr.metrics[:5]]), np.mean([r["loss"] for r in tr.metrics[-5:]])
    assert last < 0.8 * first, (first, last)


def test_cold_start_micro_batches_do_not_change_the_step():
    """Pairs of one size share a forward; the noise and s are drawn per pair, so one pair per
    forward (micro_batch 1) gives the same loss and gradient as all at once, and prompts of
    different lengths in one batch do not leak into each other (padding masked). (The first step
    is compared: after it, Adam's sign-like update turns gradient entries at rounding level into
    different weights.)"""
    items = _items(3)
    words = ["invert", "invert the colours of everything", "make it a negative image please"]
    pairs = [EditPair(it.image, Image.fromarray(255 - np.asarray(it.image)), w) for it, w in zip(items, words)]
    runs = []
    for mb in (0, 1):
        tr = AttackerTrainer(_editor(), _cfg(mode="sft", steps=1, sft_batch=3, micro_batch=mb, lr=1e-2), pairs=pairs)
        seen, step = [], tr.opt.step

        def recorded(*a, _tr=tr, _seen=seen, _step=step, **k):
            _seen.append([p.grad.clone() for p in _tr.editor.lora_parameters()])
            return _step(*a, **k)

        tr.opt.step = recorded
        runs.append((tr.sft_step()["loss"], seen[0]))
    (la, ga), (lb, gb) = runs
    assert la == pytest.approx(lb, rel=1e-6)
    scale = max(float(g.abs().max()) for g in ga)
    assert scale > 0
    assert max(float((a - b).abs().max()) for a, b in zip(ga, gb)) < 1e-5 * scale


def test_cold_start_edit_weight_weights_the_changed_tokens():
    """edit_weight: token weight 1 + w x change / max change, loss normalized by the weights; 0 is
    plain flow matching, and a pair the edit did not change has uniform weights."""
    from training.attacker import _weighted_mse, edit_weights

    clean = torch.zeros(1, 4, 2)
    edited = clean.clone()
    edited[0, 2] = torch.tensor([1.0, 3.0])  # token 2 changed by 2 on average
    edited[0, 0] = torch.tensor([0.5, 0.5])  # token 0 by 0.5
    w = edit_weights(edited, clean, 4.0)
    assert w[0].tolist() == pytest.approx([1 + 4 * 0.25, 1.0, 5.0, 1.0])
    assert edit_weights(edited, clean, 0.0) is None
    v, target = torch.zeros(1, 4, 2), torch.tensor([[[1.0, 1.0], [2.0, 2.0], [0.0, 2.0], [0.0, 0.0]]])
    per_token = [1.0, 4.0, 2.0, 0.0]
    assert float(_weighted_mse(v, target, None)) == pytest.approx(sum(per_token) / 4)
    assert float(_weighted_mse(v, target, w)) == pytest.approx((2 * 1 + 4 + 5 * 2 + 0) / 9)
    with pytest.raises(ValueError, match="edit_weight"):
        edit_weights(edited, torch.zeros(1, 8, 2), 1.0)
    # In the trainer: an unchanged pair's loss is the plain one; a changed pair's is not.
    items = _items(2)
    same = [EditPair(it.image, it.image, "keep it") for it in items]
    changed = [EditPair(it.image, Image.fromarray(255 - np.asarray(it.image)), "invert") for it in items]
    losses = {}
    for name, pairs in (("same", same), ("changed", changed)):
        for ew in (0.0, 8.0):
            tr = AttackerTrainer(_editor(), _cfg(mode="sft", steps=1, sft_batch=2, edit_weight=ew), pairs=pairs)
            losses[name, ew] = tr.sft_step()["loss"]
    assert losses["same", 8.0] == pytest.approx(losses["same", 0.0], rel=1e-6)
    assert abs(losses["changed", 8.0] - losses["changed", 0.0]) > 1e-4 * losses["changed", 0.0]


class ScriptedDefender:
    """Answers from a script, per query seed (the K queries of efficacy) and image: the image's
    colour picks the script's column, so an answer is the image's own wherever it sits in a batch."""

    def __init__(self, script: list[list[str]], columns: dict):
        self.script, self.columns, self.batches = script, columns, []

    def generate(self, images, prompts, *, temperature=0.0, seed=0):
        self.batches.append(len(images))
        return [f"\\boxed{{{self.script[seed][self.columns[im.getpixel((30, 30))]]}}}" for im in images]


class SeededScriptedDefender(ScriptedDefender):
    """The same, seeding each row (``generate(..., seeds=)``, as QwenVLPolicy and an endpoint do)."""

    def generate(self, images, prompts, *, temperature=0.0, seed=0, seeds=None):
        assert seeds == [seed] * len(images)  # query k asks every image under seed k, as if alone
        return super().generate(images, prompts, temperature=temperature, seed=seed)


def test_integrity_efficacy_with_a_scripted_defender():
    clean = np.full((40, 40, 3), 100, np.uint8)
    clean[5:20, 5:20] = 200
    edited = clean.copy()
    edited[25:38, 25:38] = 30  # distractor away from the target
    broken = clean.copy()
    broken[5:20, 5:20] = 0  # target destroyed
    broken[25:38, 25:38] = 60
    item = AttackItem("a", Image.fromarray(clean), "x", [[5, 5, 20, 20]], prompt="q", answer="A", num_options=4)
    # K = 3 queries; the clean image answered B, C, A (2 failures), the edited one C, C, A (2), the
    # broken one B, B, B (3 failures, but broken)
    script = [["B", "C", "B"], ["C", "C", "B"], ["A", "A", "B"]]
    columns = {(100, 100, 100): 0, (30, 30, 30): 1, (60, 60, 60): 2}
    for defender, calls in (
        (SeededScriptedDefender(script, columns), [2] * 3),
        (ScriptedDefender(script, columns), [1] * 6),
    ):
        reward = IntegrityEfficacy(defender, tau=0.9, queries=3)
        rows = reward([item.image] * 2, [Image.fromarray(edited), Image.fromarray(broken)], [item, item])
        assert (
            rows[0]["integrity"] == 1.0
            and rows[0]["efficacy"] == pytest.approx(2 / 3)
            and rows[0]["reward"] == pytest.approx(2 / 3)
        )
        assert rows[1]["integrity"] == 0.0 and rows[1]["efficacy"] == 1.0 and rows[1]["reward"] == 0.0
        # A defender that seeds rows answers the batch in one call per query; any other, one image
        # per call, so that each image's answers are its own whoever sits beside it.
        assert defender.batches == calls
        # The unedited baseline asks the same K queries under the same seeds: B, C, A -> 2/3.
        assert reward.unedited_efficacy([item.image, Image.fromarray(edited)], [item, item]) == [
            pytest.approx(2 / 3),
            pytest.approx(2 / 3),
        ]
    assert reward.unedited_efficacy([], []) == []


class BrightnessDefender:
    """P(right letter) = the image's mean brightness in [0, 1]; counts the images it scores."""

    def __init__(self):
        self.scored = 0

    def answer_probability(self, images, prompts, answers, num_options):
        self.scored += len(images)
        return [float(np.asarray(im, dtype=np.float64).mean() / 255) for im in images]


def test_dense_efficacy_is_the_drop_in_the_right_letters_probability():
    """Dense efficacy = P(right | clean) - P(right | edited), gated by integrity like the sampled one;
    a group's shared clean image is scored once."""
    clean = np.full((40, 40, 3), 100, np.uint8)
    clean[5:20, 5:20] = 200
    darker = clean.copy()
    darker[25:38, 25:38] = 30  # away from the target: integrity holds, the image darkens
    broken = clean.copy()
    broken[5:20, 5:20] = 0
    item = AttackItem("a", Image.fromarray(clean), "x", [[5, 5, 20, 20]], prompt="q", answer="A", num_options=4)
    defender = BrightnessDefender()
    reward = IntegrityEfficacy(defender, tau=0.9, invalid_penalty=-0.5, efficacy="dense")
    rows = reward([item.image] * 3, [Image.fromarray(a) for a in (darker, broken, clean)], [item] * 3)
    p_clean, p_dark = clean.mean() / 255, darker.mean() / 255
    assert rows[0]["integrity"] == 1.0 and rows[0]["reward"] == pytest.approx(p_clean - p_dark)
    assert rows[0]["p_right_clean"] == pytest.approx(p_clean) and rows[0]["efficacy"] > 0
    # A broken target scores the penalty, floored at -1: dense E reaches -1, and a broken edit must
    # not outscore a valid one that helps the defender (a brighter corner, E < 0).
    assert rows[1]["integrity"] == 0.0 and rows[1]["reward"] == -1.0
    assert rows[2]["reward"] == pytest.approx(0.0)  # an unchanged image takes nothing from the defender
    assert defender.scored == 1 + 3  # the clean image once, each edit once
    brighter = clean.copy()
    brighter[25:38, 25:38] = 255
    helped = reward([item.image], [Image.fromarray(brighter)], [item])[0]
    assert helped["integrity"] == 1.0 and -1.0 < helped["reward"] < 0 and helped["reward"] > rows[1]["reward"]
    harsher = IntegrityEfficacy(defender, tau=0.9, invalid_penalty=-2.0, efficacy="dense")
    assert harsher([item.image], [Image.fromarray(broken)], [item])[0]["reward"] == -2.0  # below the floor: kept
    with pytest.raises(ValueError, match="efficacy=sampled"):
        IntegrityEfficacy(ScriptedDefender([["A"]], {}), efficacy="dense")


def test_group_invalid_score_ranks_broken_edits_just_below_the_lowest_valid_one():
    """invalid_score 'group': a broken edit scores min - std of the group's valid rewards (>= 0.05
    below), so the valid edits keep their spread in the group-normalized advantages."""
    from rl.flow_grpo import group_advantages
    from training.attacker_rewards import rank_invalid_last

    clean = np.full((40, 40, 3), 100, np.uint8)
    clean[5:20, 5:20] = 200
    edits = []
    for level in (90, 60, 30):  # darker and darker corners: valid, more and more effective
        e = clean.copy()
        e[25:38, 25:38] = level
        edits.append(e)
    broken = clean.copy()
    broken[5:20, 5:20] = 0
    item = AttackItem("a", Image.fromarray(clean), "x", [[5, 5, 20, 20]], prompt="q", answer="A", num_options=4)
    images = [Image.fromarray(a) for a in (*edits, broken)]
    fixed = IntegrityEfficacy(BrightnessDefender(), tau=0.9, efficacy="dense")([item.image] * 4, images, [item] * 4)
    group = IntegrityEfficacy(BrightnessDefender(), tau=0.9, efficacy="dense", invalid_score="group")(
        [item.image] * 4, images, [item] * 4
    )
    valid = [r["reward"] for r in fixed[:3]]
    assert [r["reward"] for r in group[:3]] == valid  # valid edits untouched
    assert group[3]["reward"] == pytest.approx(min(valid) - max(float(np.std(valid)), 0.05))
    assert fixed[3]["reward"] == -1.0
    # The valid edits' advantage spread: under the fixed -1 the broken edit squeezes it.
    spread = lambda rows: float(np.ptp(group_advantages(torch.tensor([r["reward"] for r in rows]), 4)[:3].numpy()))  # noqa: E731
    assert spread(group) > 2 * spread(fixed)
    # Edge cases: all valid or all broken leave the rewards alone; one valid keeps the 0.05 margin.
    assert rank_invalid_last(group[:3]) == group[:3]
    allbad = [{"integrity": 0.0, "reward": -1.0}] * 2
    assert rank_invalid_last(allbad) == allbad
    one = rank_invalid_last([{"integrity": 1.0, "reward": 0.2}, {"integrity": 0.0, "reward": -1.0}])
    assert one[1]["reward"] == pytest.approx(0.15)
    # 'skip': a broken edit gets no reward (NaN) and so no advantage; the valid ones keep theirs.
    skip = IntegrityEfficacy(BrightnessDefender(), tau=0.9, efficacy="dense", invalid_score="skip")(
        [item.image] * 4, images, [item] * 4
    )
    assert [r["reward"] for r in skip[:3]] == valid and math.isnan(skip[3]["reward"])
    adv = group_advantages(torch.tensor([r["reward"] for r in skip]), 4)
    assert adv[3] == 0.0 and adv[2] > adv[1] > adv[0]  # darker corners fool the brightness defender more
    with pytest.raises(ValueError, match="invalid_score"):
        IntegrityEfficacy(BrightnessDefender(), invalid_score="lowest")
    # 'dual': a broken edit scores the valid mean minus the price; the price moves by
    # dual_lr * (target - integrity rate) after each group, never below 0, and resumes from its state.
    dual = IntegrityEfficacy(
        BrightnessDefender(), tau=0.9, efficacy="dense", invalid_score="dual", integrity_target=0.9, dual_lr=0.5
    )
    first = dual([item.image] * 4, images, [item] * 4)
    assert [r["reward"] for r in first[:3]] == valid and first[3]["reward"] == pytest.approx(float(np.mean(valid)))
    assert dual.integrity_price == pytest.approx(0.5 * (0.9 - 0.75))
    second = dual([item.image] * 4, images, [item] * 4)
    assert second[3]["reward"] == pytest.approx(float(np.mean(valid)) - 0.075) and second[3][
        "integrity_price"
    ] == pytest.approx(0.075)
    assert dual.integrity_price == pytest.approx(0.15)
    dual([item.image] * 3, images[:3], [item] * 3)  # all intact: the price falls by 0.5 * 0.1
    assert dual.integrity_price == pytest.approx(0.1)
    resumed = IntegrityEfficacy(BrightnessDefender(), tau=0.9, efficacy="dense", invalid_score="dual")
    resumed.load_state_dict(dual.state_dict())
    assert resumed.integrity_price == pytest.approx(0.1)
    low = IntegrityEfficacy(BrightnessDefender(), tau=0.9, efficacy="dense", invalid_score="dual", integrity_target=0.0)
    low([item.image] * 4, images, [item] * 4)
    assert low.integrity_price == 0.0  # more intact than asked: no price, not a negative one


def test_attack_summary_reads_success_against_the_unedited_baseline():
    from stages.curriculum import attack_summary

    kept = [
        {"efficacy": 1.0, "clean_efficacy": 0.0},  # a flip: right when clean, fooled when edited
        {"efficacy": 2 / 3, "clean_efficacy": 1 / 3},  # already failed unedited: success, no lift
        {"efficacy": 0.0, "clean_efficacy": 1.0},  # the edit made it right: negative lift
        {"efficacy": 0.0, "clean_efficacy": 0.0},
    ]
    s = attack_summary(kept, items=8)  # 4 more items failed integrity
    assert s == {
        "integrity_rate": 0.5,
        "attack_success_rate": 0.25,
        "clean_failure_rate": 0.25,
        "attack_lift": 0.0,
        "flip_rate": 0.125,
        "mean_efficacy": pytest.approx((1 + 2 / 3) / 4),
    }
    assert attack_summary([], items=0)["attack_lift"] == 0.0


def test_flow_grpo_learns_to_brighten_a_box():
    """Learnability on CPU: Flow-GRPO raises the box-contrast reward of the tiny editor, and the
    change it learned is inside the box. Measured (seed 0, 40 steps of 4 sampling steps, 39 s on
    one thread): reward (mean of the first / last 5 steps) 0.0009 -> 0.0099; deterministic samples
    against the reference (LoRA off, same noise): box +5.84-5.90 grey levels, outside +2.62-2.64, outside
    SSIM 0.624. (6 sampling steps: 0.0092 gain, box - outside 3.87, 60 s; 3 steps do not learn
    in 40: gain 0.0017.)"""
    torch.manual_seed(0)
    ed = _editor()
    items = _items(4)
    cfg = _cfg(steps=40, lr=3e-2, lora_rank=8, lora_alpha=16, flow_grpo={"group_size": 8, "sampling_steps": 4})
    tr = AttackerTrainer(ed, cfg, items=items, rewards={"contrast": box_contrast})
    tr.train()
    r = [m["reward"] for m in tr.metrics]
    first, last = np.mean(r[:5]), np.mean(r[-5:])
    assert last - first >= 0.005, (first, last)
    cond = ed.condition([tr.items[0].image], [tr.items[0].instruction]).repeat(4)
    x = ed.noise(cond, torch.Generator().manual_seed(123))
    trained = np.stack(
        [np.asarray(i.convert("L"), float) for i in ed.decode(sample(ed, cond, 4, 0.0, x=x).final, cond)]
    )
    with ed.reference():
        ref = np.stack(
            [np.asarray(i.convert("L"), float) for i in ed.decode(sample(ed, cond, 4, 0.0, x=x).final, cond)]
        )
    inside = np.zeros(trained.shape[1:], bool)
    inside[8:24, 8:24] = True
    d_in, d_out = (trained - ref)[:, inside].mean(), (trained - ref)[:, ~inside].mean()
    outside_only = np.where(inside, ref, trained)  # the box pasted back: what remains is the outside change
    ssim_out = np.mean([region_ssim(o.astype(np.uint8), r.astype(np.uint8)) for o, r in zip(outside_only, ref)])
    print(
        f"reward {first:.4f} -> {last:.4f}; box brightness change {d_in:.2f}, outside {d_out:.2f}, "
        f"outside SSIM {ssim_out:.3f}"
    )
    assert d_in - d_out >= 2.0 and ssim_out >= 0.5, (d_in, d_out, ssim_out)


def test_micro_batches_sample_and_train_in_the_same_split():
    tr = AttackerTrainer(_editor(), _cfg(steps=1, micro_batch=2), items=_items(), rewards={"contrast": box_contrast})
    tr.train()
    m = tr.metrics[0]
    assert m["ratio_max"] == 1.0 and m["ratio_mean"] == 1.0 and len(tr.samples) == 2 * 4
    assert m["trained_steps"] == 2 * 2 * 3  # 2 groups x 2 micro-batches x 3 SDE steps


def test_tiny_vae_fit_makes_reconstruction_faithful_and_is_cached(tmp_path, monkeypatch):
    """A random tiny VAE decodes world images far from themselves; ``vae_fit`` fits it (measured
    here: SSIM 0.22 -> 0.52 after 60 steps at 32 px) and caches the weights: a second build
    loads them (equal tensors) instead of fitting again."""
    from models.editor import QwenImageEditor
    from world import WorldConfig, generate_world, render

    monkeypatch.setenv("AOT_CACHE", str(tmp_path))
    test = [render(generate_world(777 + i, WorldConfig(resolution=32))) for i in range(6)]

    def fidelity(ed):
        out = []
        for im in test:
            im = ed.resize(im)
            out.append(
                region_ssim(np.asarray(im), np.asarray(ed.decode(ed.latents_of([im]), ed.condition([im], ["x"]))[0]))
            )
        return float(np.mean(out))

    fit = {"steps": 40, "scenes": 48}
    before = fidelity(QwenImageEditor.tiny(resolution=32))
    fitted = QwenImageEditor.tiny(resolution=32, vae_fit=fit)
    after = fidelity(fitted)
    assert after >= before + 0.15, (before, after)
    (cached,) = (tmp_path / "tiny-vae").glob("*.safetensors")
    stamp = cached.stat().st_mtime_ns
    from safetensors import safe_open

    with safe_open(str(cached), "pt") as f:  # the file names its fit
        key = json.loads(f.metadata()["aot_fit_key"])
    assert key["steps"] == 40 and key["scenes"] == 48 and key["resolution"] == 32
    from models.cache import kernel_family

    assert key["kernels"] == kernel_family(["cpu"])  # another machine's fit is another cache entry
    assert key["threads"] == torch.get_num_threads()  # and so is a fit on another thread count
    again = QwenImageEditor.tiny(resolution=32, vae_fit=fit)
    assert cached.stat().st_mtime_ns == stamp
    for (n, a), (_, b) in zip(fitted.pipe.vae.state_dict().items(), again.pipe.vae.state_dict().items()):
        assert torch.equal(a, b), n
    assert not any(p.requires_grad for p in again.pipe.vae.parameters())  # frozen again for the attacker
    # Editors of other seeds (the evidence experiment's arms) share the one fit.
    other = QwenImageEditor.tiny(seed=3, resolution=32, vae_fit=fit)
    assert len(list((tmp_path / "tiny-vae").glob("*.safetensors"))) == 1
    for (n, a), (_, b) in zip(fitted.pipe.vae.state_dict().items(), other.pipe.vae.state_dict().items()):
        assert torch.equal(a, b), n


def test_tiny_editor_fit_learns_to_copy_its_input_and_is_cached(tmp_path, monkeypatch):
    """A random tiny transformer's edit shares nothing with its input (latent MSE to the condition
    ~1.5, measured); ``editor_fit`` trains it on world edit pairs (measured: 0.05 after 60 steps of
    8 at 32 px) and caches it: another seed's editor loads the same weights without fitting."""
    from models.editor import QwenImageEditor, world_edit_pairs
    from rl.flow_sampler import sample

    monkeypatch.setenv("AOT_CACHE", str(tmp_path))
    pairs = world_edit_pairs(6, 32, seed=99)
    for clean, edited, instruction in pairs:  # one object added where nothing was; the rest untouched
        diff = np.abs(np.asarray(clean, dtype=int) - np.asarray(edited, dtype=int)).sum(-1) > 0
        assert 0 < diff.mean() < 0.25 and instruction.endswith("unchanged.")

    def distance(ed):
        cond = ed.condition([p[0] for p in pairs], [p[2] for p in pairs])
        x = sample(ed, cond, 4, 0.0, generator=torch.Generator().manual_seed(0)).latents[-1]
        return float(((x - cond.image_latents) ** 2).mean())

    fit = {"steps": 60, "scenes": 64, "batch": 8}
    before = distance(QwenImageEditor.tiny(resolution=32))
    fitted = QwenImageEditor.tiny(resolution=32, editor_fit=fit)
    after = distance(fitted)
    assert after < before / 10, (before, after)
    (cached,) = (tmp_path / "tiny-editor").glob("*.safetensors")
    # the default architecture spelled out ({layers: 2, z_dim: 4}) is the same model: one fit
    other = QwenImageEditor.tiny(seed=5, resolution=32, editor_fit=fit, layers=2, z_dim=4)
    assert len(list((tmp_path / "tiny-editor").glob("*.safetensors"))) == 1
    for part in ("transformer", "text_encoder"):  # the fitted transformer reads this text encoder's embeddings
        for (n, a), (_, b) in zip(
            getattr(fitted.pipe, part).state_dict().items(), getattr(other.pipe, part).state_dict().items()
        ):
            assert torch.equal(a, b), (part, n)
    assert not any(p.requires_grad for p in other.transformer.parameters())
    assert distance(other) == pytest.approx(after)  # the same editor, whoever fitted it


def test_the_embedded_defaults_fits_ship_with_the_code(tmp_path, monkeypatch):
    """The synthetic preset's editor fits ship in models/fitted (experiments/ship_fits.py), each
    named by its fit key without kernels: a fresh cache builds the preset's attacker without
    fitting (nothing written to the cache) and with the shipped tensors, whatever this machine's
    kernels. The shipped VAE round-trips held-out world images (SSIM 0.906 when fitted); with
    ``AOT_NO_SHIPPED_FITS`` set, the lookup finds nothing (ship_fits.py then fits afresh)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from models.cache import SHIPPED_FITS, shipped_fit, shipped_fit_path
    from models.editor import load_editor
    from stages.registry import resolve_config
    from world import WorldConfig, generate_world, render

    shipped = {kind: sorted((SHIPPED_FITS / kind).glob("*.safetensors")) for kind in ("tiny-vae", "tiny-editor")}
    for kind, files in shipped.items():
        assert files, f"no shipped {kind} fit: run experiments/ship_fits.py"
        for f in files:  # the name is the key's: a file cannot answer for another fit
            with safe_open(str(f), "pt") as sf:
                key = json.loads(sf.metadata()["aot_fit_key"])
            assert f == shipped_fit_path(kind, key), f

    monkeypatch.setenv("AOT_CACHE", str(tmp_path))
    monkeypatch.delenv("AOT_NO_SHIPPED_FITS", raising=False)
    spec = resolve_config("synthetic").attacker.model
    ed = load_editor(spec)
    assert not list(tmp_path.rglob("*.safetensors"))  # nothing fitted
    for kind, module in (("tiny-vae", ed.pipe.vae), ("tiny-editor", ed.transformer)):
        state = module.state_dict()
        assert any(all(torch.equal(state[n], t) for n, t in load_file(str(f)).items()) for f in shipped[kind]), (
            f"{kind}: the preset's attacker does not carry a shipped fit (its key changed? rerun ship_fits.py)"
        )
    assert ed.pipe.vae.config.scaling_factor != 1.0  # the fit's latent scale travels with it

    test = [ed.resize(render(generate_world(900_000 + i, WorldConfig(resolution=64)))) for i in range(6)]
    with torch.no_grad():
        out = ed.decode(ed.latents_of(test), ed.condition(test, ["x"] * len(test)))
    fidelity = np.mean([region_ssim(np.asarray(a), np.asarray(b)) for a, b in zip(test, out)])
    assert fidelity >= 0.85, fidelity

    monkeypatch.setenv("AOT_NO_SHIPPED_FITS", "1")
    with safe_open(str(shipped["tiny-vae"][0]), "pt") as sf:
        assert shipped_fit("tiny-vae", json.loads(sf.metadata()["aot_fit_key"])) is None


def test_concurrent_builders_fit_once_and_load_the_same_weights(tmp_path, monkeypatch):
    """Two builders of one cached fit at the same time (the evidence run's seed processes): one
    fits, the other waits on the lock and loads the result."""
    import threading
    import time

    from models.editor import QwenImageEditor

    monkeypatch.setenv("AOT_CACHE", str(tmp_path))
    editors = [QwenImageEditor.tiny(resolution=32, seed=s) for s in (0, 1)]
    calls = []

    def fit_for(ed):
        def fit():
            calls.append(ed)
            time.sleep(0.5)  # long enough for the other builder to arrive while this one fits
            for p in ed.pipe.vae.parameters():
                p.data.fill_(0.25)

        return fit

    threads = [
        threading.Thread(target=ed._fit_cached, args=("tiny-vae", ed.pipe.vae, {"k": 1}, fit_for(ed))) for ed in editors
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    for ed in editors:
        assert all(torch.all(p == 0.25) for p in ed.pipe.vae.parameters())


def test_selective_checkpointing_recomputes_only_the_checkpointed_blocks_and_keeps_gradients():
    ed = _editor()
    ed.add_lora(4, 8, seed=0)
    blocks = list(ed.transformer.transformer_blocks)
    calls = [0]
    for b in blocks:
        b.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    img = Image.new("RGB", (32, 32), (120, 90, 60))
    cond = ed.condition([img], ["add a red cube"])
    x = ed.noise(cond, generator=torch.Generator().manual_seed(0))
    grads = {}
    for keep in (0, 1, len(blocks)):
        ed.transformer.train()
        ed.enable_gradient_checkpointing(keep)
        ed.transformer.zero_grad()
        calls[0] = 0
        ed.velocity(x, torch.tensor(500.0), cond, guidance=False).square().mean().backward()
        # one forward per block, plus a recomputation in backward of each checkpointed block
        assert calls[0] == len(blocks) + (len(blocks) - keep)
        grads[keep] = torch.cat([p.grad.flatten() for p in ed.lora_parameters()])
    assert torch.allclose(grads[0], grads[len(blocks)], atol=1e-6) and torch.allclose(grads[0], grads[1], atol=1e-6)
    with pytest.raises(ValueError, match="blocks"):
        ed.enable_gradient_checkpointing(len(blocks) + 1)


def test_first_update_is_on_policy_in_bf16():
    """The first ratio is exactly 1 on the tiny editor in bf16 too, at every trained step: the
    rollout's log-prob is of the sample as stored, and the update re-scores that very tensor."""
    from models.editor import QwenImageEditor

    ed = QwenImageEditor.tiny(seed=0, resolution=32, dtype=torch.bfloat16)
    ed.add_lora(4, 8)
    cond = ed.condition([_items(1)[0].image], ["x"]).repeat(4)
    traj = sample(ed, cond, 6, 1.0, generator=torch.Generator().manual_seed(0))
    assert traj.latents[1].dtype == torch.bfloat16 and traj.sde_steps == [0, 1, 2, 3, 4]
    for i in traj.sde_steps:
        out = step_log_prob(ed, traj, i, cond, 1.0)
        assert torch.equal(torch.exp(out.log_prob.detach() - traj.log_probs[:, i]), torch.ones(4)), i
    tr = AttackerTrainer(
        QwenImageEditor.tiny(seed=0, resolution=32, dtype=torch.bfloat16),
        _cfg(steps=1),
        items=_items(),
        rewards={"contrast": box_contrast},
    )
    tr.train()
    assert tr.metrics[0]["ratio_max"] == 1.0 and tr.metrics[0]["clip_fraction"] == 0.0


def test_deterministic_kernels_hold_inside_and_restore_the_settings_after():
    """The fits run on deterministic kernels (on an H200 two 100-step fits of the tiny VAE differed
    by up to 0.034 without them and were bit-identical with them: experiments/fit_determinism.py);
    the caller's settings come back, also after an error."""
    from models.deterministic import deterministic_kernels

    cuda = torch.backends.cuda

    def settings():
        return (
            torch.are_deterministic_algorithms_enabled(),
            torch.backends.cudnn.benchmark,
            cuda.flash_sdp_enabled(),
            cuda.mem_efficient_sdp_enabled(),
            cuda.math_sdp_enabled(),
        )

    before = settings()
    assert before[:2] == (False, False) and before[2] and before[3]  # torch's defaults
    with pytest.raises(RuntimeError, match="inside"):
        with deterministic_kernels():
            assert torch.backends.cudnn.deterministic
            # deterministic algorithms; attention only on the math kernel (the fused ones' backward uses atomics)
            assert settings() == (True, False, False, False, True)
            raise RuntimeError("inside")
    assert settings() == before


def test_restore_targets_gives_back_every_target_pixel_and_nothing_else():
    from metrics import localized_ssim
    from training.attacker import restore_targets

    rng = np.random.RandomState(1)
    clean = Image.fromarray(rng.randint(0, 256, (20, 30, 3), dtype=np.uint8))
    edited = Image.fromarray(rng.randint(0, 256, (20, 30, 3), dtype=np.uint8))
    boxes = [[2.5, 3.2, 9.1, 11.0], [25.4, 15.0, 40.0, 25.0]]  # fractional, the second past the edge
    out = np.asarray(restore_targets(clean, edited, boxes))
    kept = np.zeros((20, 30), dtype=bool)
    kept[3:11, 2:10] = True  # rounded outwards: x 2..10, y 3..11
    kept[15:20, 25:30] = True  # clipped to the image
    assert np.array_equal(out[kept], np.asarray(clean)[kept])
    assert np.array_equal(out[~kept], np.asarray(edited)[~kept])
    assert [localized_ssim(clean, Image.fromarray(out), b) for b in boxes] == [1.0, 1.0]
    assert restore_targets(clean, edited, []) is edited  # nothing to protect (no target box)
    with pytest.raises(ValueError, match="differ in size"):
        restore_targets(clean, edited.resize((10, 10)), boxes)


def test_restore_targets_by_mask_gives_back_the_shape_one_pixel_wider():
    """attacker.keep_target_shapes: the mask's pixels and their 1-px ring come back from the clean
    image, the rest of the box (its corners) stays edited; the mask rides along at the edit size."""
    from training.attacker import at_edit_size, restore_targets

    rng = np.random.RandomState(2)
    clean = Image.fromarray(rng.randint(0, 256, (20, 30, 3), dtype=np.uint8))
    edited = Image.fromarray(rng.randint(0, 256, (20, 30, 3), dtype=np.uint8))
    mask = np.zeros((20, 30), dtype=bool)
    mask[8:11, 12:15] = True  # a 3x3 "shape" inside a box 10..18 x 6..14
    out = np.asarray(restore_targets(clean, edited, [[10, 6, 18, 14]], Image.fromarray(mask.astype(np.uint8) * 255)))
    ring = np.zeros_like(mask)
    ring[7:12, 11:16] = True  # the shape dilated by one pixel (3x3 cross structure: corners excluded)
    for y, x in [(7, 11), (7, 15), (11, 11), (11, 15)]:
        ring[y, x] = False
    assert np.array_equal(out[ring], np.asarray(clean)[ring])
    assert np.array_equal(out[~ring], np.asarray(edited)[~ring])  # the box's corners included
    with pytest.raises(ValueError, match="differ in size"):
        restore_targets(clean, edited, [[10, 6, 18, 14]], Image.new("L", (10, 10)))

    class Half:
        def resize(self, im):
            return im.resize((im.width // 2, im.height // 2))

    item = AttackItem("m", clean, "x", [[10, 6, 18, 14]], target_mask=Image.fromarray(mask.astype(np.uint8) * 255))
    small = at_edit_size(Half(), item)
    assert small.image.size == small.target_mask.size == (15, 10)
    half = np.asarray(small.target_mask)
    assert set(np.unique(half)) == {0, 255}  # nearest sampling: a mask stays a mask, never blended
    ys, xs = np.nonzero(half)
    assert ys.min() >= 4 and ys.max() <= 5 and xs.min() >= 6 and xs.max() <= 7  # the square, halved
    assert at_edit_size(Half(), dataclasses.replace(item, target_mask=None)).target_mask is None


def test_integrity_with_a_target_mask_gates_the_shape_not_its_box():
    """keep_target_shapes: a change in the box's corners (background) passes the gate, a change on
    the target's own pixels fails it; without a mask both change the box and both fail."""
    from training.attacker_rewards import AttackSample, integrity, targets_view

    rng = np.random.RandomState(3)
    clean = rng.randint(0, 256, (24, 24, 3)).astype(np.uint8)
    mask = np.zeros((24, 24), dtype=bool)
    mask[9:15, 9:15] = True  # the object inside its box 6..18
    box = [[6, 6, 18, 18]]
    corner, on_object = clean.copy(), clean.copy()
    corner[6:9, 6:18] = 255 - corner[6:9, 6:18]  # the box's top rows: background only
    on_object[10:14, 10:14] = 255 - on_object[10:14, 10:14]
    m = Image.fromarray(mask.astype(np.uint8) * 255)
    c = Image.fromarray(clean)

    def gate(edited, with_mask):
        return integrity(c, Image.fromarray(edited), AttackSample(box, [], m if with_mask else None), tau=0.9)

    assert gate(corner, True)["integrity"] == 1.0 and gate(corner, True)["target_ssim_min"] == pytest.approx(1.0)
    assert gate(on_object, True)["integrity"] == 0.0
    assert gate(corner, False)["integrity"] == 0.0 and gate(on_object, False)["integrity"] == 0.0
    view = np.asarray(targets_view(c, Image.fromarray(corner), m))
    assert np.array_equal(view, clean)  # the corner change is not the target's
    e = Image.fromarray(corner)
    assert targets_view(c, e, None) is e  # no mask: the gate sees the edit itself


def test_keep_targets_scores_rollouts_with_their_targets_given_back():
    """With keep_targets the reward sees every rollout with its target box exactly as in the clean
    image, so box_contrast (brighten the box) can only be raised by darkening the rest; without it
    the box is the editor's."""
    seen = {}

    def recorder(cleans, editeds, items):
        for c, e, it in zip(cleans, editeds, items):
            x0, y0, x1, y1 = (int(v) for v in it.target_boxes[0])
            seen.setdefault(tr.placement.keep_targets, []).append(
                np.array_equal(np.asarray(c)[y0:y1, x0:x1], np.asarray(e)[y0:y1, x0:x1])
            )
        return box_contrast(cleans, editeds, items)

    for keep in (True, False):
        tr = AttackerTrainer(
            _editor(), _cfg(steps=2), items=_items(), rewards={"c": recorder}, placement=Placement(keep_targets=keep)
        )
        before = {k: v.clone() for k, v in tr.editor.lora_state().items()}
        tr.train()
        assert all(not torch.equal(before[k], v) for k, v in tr.editor.lora_state().items())  # it trains
    assert len(seen[True]) == 16 and all(seen[True])  # 2 steps x 2 groups x 4 edits
    assert not any(seen[False])


def test_carry_edit_applies_the_editors_change_at_the_images_own_size():
    """attacker.edits_at_source_size: clean + the change upsampled. No change gives the clean
    image back byte for byte; a uniform change shifts every pixel by it (clipped to 8 bits); a
    change in the left half never reaches the right quarter; same sizes return the edit."""
    from training.attacker import carry_edit, place_edit

    rng = np.random.RandomState(2)
    clean = Image.fromarray(rng.randint(0, 200, (24, 40, 3), dtype=np.uint8))  # 40 x 24, the editor's 20 x 12
    seen = Image.fromarray(rng.randint(0, 200, (12, 20, 3), dtype=np.uint8))
    assert np.array_equal(np.asarray(carry_edit(clean, seen, seen)), np.asarray(clean))
    plus = Image.fromarray((np.asarray(seen).astype(int) + 30).astype(np.uint8))
    shifted = np.asarray(carry_edit(clean, seen, plus)).astype(int)
    assert np.array_equal(shifted, np.minimum(np.asarray(clean).astype(int) + 30, 255))
    left = np.asarray(seen).copy()
    left[:, :10] = 255  # the left half of the editor's image turned white
    out = np.asarray(carry_edit(clean, seen, Image.fromarray(left))).astype(int)
    c = np.asarray(clean).astype(int)
    assert np.array_equal(out[:, 30:], c[:, 30:])  # bilinear reaches at most one source pixel across
    assert (out[:, :18] >= c[:, :18]).all() and (out[:, :18] > c[:, :18]).mean() > 0.9
    assert carry_edit(seen, seen, plus) is plus
    with pytest.raises(ValueError, match="differ in size"):
        carry_edit(clean, seen, plus.resize((10, 6)))
    # place_edit: carried, then the target given back at the clean image's size
    item = AttackItem("i", clean, "x", [[4, 2, 16, 12]])
    placed = np.asarray(place_edit(item, seen, plus, Placement(keep_targets=True))).astype(int)
    assert np.array_equal(placed[2:12, 4:16], c[2:12, 4:16])
    assert np.array_equal(placed[12:], np.minimum(c[12:] + 30, 255))
    # attacker.change_from_reconstruction: the change is taken against the editor's reconstruction
    # of what it saw, at any size; an edit equal to it gives the clean image back byte for byte
    recon = Image.fromarray((np.asarray(seen).astype(int) // 2 + 20).astype(np.uint8))  # a lossy round trip
    for base in (clean, seen):
        assert np.array_equal(np.asarray(carry_edit(base, seen, recon, recon)), np.asarray(base))
    over = Image.fromarray((np.asarray(recon).astype(int) + 30).astype(np.uint8))
    assert np.array_equal(
        np.asarray(carry_edit(seen, seen, over, recon)), np.minimum(np.asarray(seen).astype(int) + 30, 255)
    )
    assert np.array_equal(np.asarray(carry_edit(clean, seen, over, recon)), np.minimum(c + 30, 255))
    assert np.array_equal(np.asarray(place_edit(item, seen, recon, Placement(), recon)), c)
    # attacker.change_floor: a pixel moved by less than the floor in every channel keeps its clean
    # value; one channel at or above it carries the pixel's whole change (at the edit size: the
    # right half moved by 10, the left half's red channel by 40)
    moved = np.asarray(seen).astype(int) + np.array([0, 10, 10])
    moved[:, :10, 0] += 40
    moved = Image.fromarray(moved.clip(0, 255).astype(np.uint8))
    d = np.asarray(moved).astype(int) - np.asarray(seen).astype(int)
    got = np.asarray(carry_edit(seen, seen, moved, None, floor=16)).astype(int) - np.asarray(seen).astype(int)
    assert np.array_equal(got[:, 10:], np.zeros_like(got[:, 10:])) and np.array_equal(got[:, :10], d[:, :10])
    assert np.array_equal(np.asarray(carry_edit(seen, seen, moved, None, floor=0)), np.asarray(moved))
    assert np.array_equal(
        np.asarray(place_edit(item, seen, moved, Placement(change_floor=16))).astype(int)[:, 30:], c[:, 30:]
    )


def test_flow_grpo_scores_edits_at_the_items_own_size_when_asked():
    """With at_source_size the reward gets each item's own clean image and the edit carried to its
    size (64 px items, a 32 px editor); without it both at the editor's 32 px."""
    seen = {}
    items = _items(size=64)
    by_id = {it.id: it for it in items}

    def recorder(cleans, editeds, its):
        for c, e, it in zip(cleans, editeds, its):
            seen.setdefault(at_source, []).append(
                (c.size, e.size, np.array_equal(np.asarray(c), np.asarray(by_id[it.id].image)))
            )
        return box_contrast(cleans, editeds, its)

    for at_source in (True, False):
        tr = AttackerTrainer(
            _editor(),
            _cfg(steps=1),
            items=items,
            rewards={"c": recorder},
            placement=Placement(at_source_size=at_source),
        )
        tr.train()
    assert len(seen[True]) == 8 and set(seen[True]) == {((64, 64), (64, 64), True)}  # 2 groups x 4 edits
    assert len(seen[False]) == 8 and set(seen[False]) == {((32, 32), (32, 32), False)}


def test_flow_grpo_scores_edits_from_the_reconstruction_when_asked():
    """With from_reconstruction the reward sees clean + (the rollout's image - the editor's
    reconstruction of the item), each group's reconstruction decoded from its condition latents."""
    ed = _editor()
    decoded, seen = [], []
    inner = ed.decode

    def recording(x, cond):
        out = inner(x, cond)
        decoded.append(out)
        return out

    ed.decode = recording

    def recorder(cleans, editeds, its):
        seen.append((cleans, editeds))
        return box_contrast(cleans, editeds, its)

    AttackerTrainer(
        ed, _cfg(steps=1), items=_items(), rewards={"c": recorder}, placement=Placement(from_reconstruction=True)
    ).train()
    assert len(seen) == 2 and len(decoded) == 4  # 2 groups: the 4 rollouts, then the reconstruction
    for (cleans, editeds), raw, (recon,) in zip(seen, decoded[0::2], decoded[1::2]):
        for c, e, r in zip(cleans, editeds, raw):
            want = np.asarray(c, dtype=int) + np.asarray(r, dtype=int) - np.asarray(recon, dtype=int)
            assert np.array_equal(np.asarray(e, dtype=int), np.clip(want, 0, 255))


def test_kontext_vae_fit_sets_the_latent_scale_and_the_cache_keeps_it(tmp_path, monkeypatch):
    """The tiny FLUX.1-Kontext editor with a stride-4 2-D VAE (the CPU-fittable editor): its fit
    reconstructs world images better than the random VAE, sets shift/scale so that the fit
    images' latents have mean 0 and std 1, and a second build loads weights *and* scale from
    the cache."""
    from models.editor import FluxKontextEditor
    from world import WorldConfig, generate_world, render

    monkeypatch.setenv("AOT_CACHE", str(tmp_path))
    arch = {"resolution": 32, "vae_channels": [8, 16, 16], "latent_channels": 4}
    fit = {"steps": 60, "scenes": 32, "batch": 8, "lr": 2e-3}
    test = [render(generate_world(777 + i, WorldConfig(resolution=32))) for i in range(6)]

    def fidelity(ed):
        ims = [ed.resize(im) for im in test]
        lat = ed.latents_of(ims)
        out = ed.pipe.image_processor.postprocess(
            ed._decode(ed.pipe._unpack_latents(lat, 32, 32, ed.pipe.vae_scale_factor)), output_type="pil"
        )
        return float(np.mean([region_ssim(np.asarray(a), np.asarray(b)) for a, b in zip(ims, out)]))

    random_vae = FluxKontextEditor.tiny(**arch)
    assert random_vae.multiple == 8  # stride 4 x 2x2 packing
    fitted = FluxKontextEditor.tiny(**arch, vae_fit=fit)
    before, after = fidelity(random_vae), fidelity(fitted)
    assert after >= before + 0.15, (before, after)
    fit_images = [
        fitted.resize(render(generate_world(10_000_000 + i, WorldConfig(resolution=32)))) for i in range(fit["scenes"])
    ]
    lat = fitted.latents_of(fit_images)
    assert abs(float(lat.mean())) < 1e-4 and abs(float(lat.std()) - 1) < 1e-3
    scale = fitted.pipe.vae.config.scaling_factor
    assert scale != 1.0  # not the random VAE's
    again = FluxKontextEditor.tiny(**arch, vae_fit=fit)
    assert len(list((tmp_path / "tiny-vae").glob("*.safetensors"))) == 1
    assert again.pipe.vae.config.scaling_factor == scale
    assert again.pipe.vae.config.shift_factor == fitted.pipe.vae.config.shift_factor
    assert torch.equal(again.latents_of(fit_images[:4]), lat[:4])


def test_kontext_instruction_reaches_t5_whole():
    """The tiny T5 tokenizer spends about one token per character: the editor's instruction must
    not be cut before the question (at the old 32 tokens it kept "Change the scene so that answ")."""
    from models.editor import FluxKontextEditor, attack_instruction

    ed = FluxKontextEditor.tiny(resolution=32)
    text = attack_instruction("What is the colour of the circle?", ["circle"])
    assert len(ed.pipe.tokenizer_2(text).input_ids) <= ed.max_sequence_length
    a = ed._encode_prompts([text], None)[0]["encoder_hidden_states"]
    b = ed._encode_prompts([text.replace("circle?", "square?")], None)[0]["encoder_hidden_states"]
    assert not torch.equal(a, b)
