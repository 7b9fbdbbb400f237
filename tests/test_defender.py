"""The tiny Qwen2.5-VL defender under SFT and DAPO: parameters move, ratios start at 1, resume is
exact, it learns, and our DAPO loss equals TRL's on identical inputs."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from config import DefenderTrainConfig
from evaluation.answers import chance
from evaluation.answers import mcq_accuracy as evaluate
from models.qwen_vl import QwenVLPolicy, TinyDefenderSpec
from models.shared_images import repeated_images
from rl.dapo import DapoConfig, dapo_loss, group_advantages
from training.defender import DataStream, DefenderTrainer
from training.toy import colour_examples

SPEC = TinyDefenderSpec(min_pixels=32 * 32, max_pixels=64 * 64)


@pytest.fixture(scope="module")
def data():
    return colour_examples(256, seed=0), colour_examples(128, seed=1)


@pytest.fixture(scope="module")
def warm_policy(data):
    """A policy after 60 SFT steps: the format is learned, colours half-learned (mixed groups)."""
    torch.manual_seed(0)
    policy = QwenVLPolicy.tiny(seed=0, spec=SPEC)
    DefenderTrainer(policy, data[0], DefenderTrainConfig(mode="sft", steps=60, batch_prompts=32, lr=1e-3)).train()
    return policy


def _dapo_cfg(**kw):
    base = dict(
        mode="dapo",
        steps=4,
        batch_prompts=8,
        lr=1e-3,
        weight_decay=0.0,
        max_new_tokens=3,
        micro_batch=40,
        dapo=DapoConfig(group_size=5, max_draw_factor=8),
    )
    base.update(kw)
    return DefenderTrainConfig(**base)


def test_every_trainable_parameter_changes(warm_policy, data):
    policy = copy.deepcopy(warm_policy)
    before = {n: p.detach().clone() for n, p in policy.model.named_parameters() if p.requires_grad}
    # No weight decay: a parameter can only move through its gradient.
    DefenderTrainer(policy, data[0], _dapo_cfg(steps=3)).train()
    unchanged = [n for n, p in policy.model.named_parameters() if p.requires_grad and torch.equal(p, before[n])]
    assert not unchanged, unchanged
    assert len(before) > 50  # vision tower, merger and language model all train


def test_first_update_is_on_policy_and_equals_policy_gradient(warm_policy, data):
    policy = copy.deepcopy(warm_policy)
    ex = data[0][:6]
    rep = [e for e in ex for _ in range(5)]
    images, prompts = [e.image for e in rep], [e.prompt for e in rep]
    roll = policy.rollout(images, prompts, temperature=1.0, max_new_tokens=3, seed=3)
    from models.mcq import mcq_reward

    rewards = torch.tensor([mcq_reward(t, e.answer, 4) for t, e in zip(roll.texts, rep)])
    assert 0 < rewards.sum() < len(rep)  # mixed outcomes: the advantages are not all zero
    adv = group_advantages(rewards, 5)
    with torch.no_grad():
        old = policy.response_logprobs(images, prompts, roll.response_ids, roll.response_mask)
    logp = policy.response_logprobs(images, prompts, roll.response_ids, roll.response_mask)
    mask = roll.response_mask.float()
    loss, st = dapo_loss(logp, old, adv, mask, DapoConfig())
    assert st.ratio_max == 1.0 and st.ratio_mean == pytest.approx(1.0, abs=0) and st.clip_fraction == 0.0
    params = [p for p in policy.model.parameters() if p.requires_grad]
    g_dapo = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    pg = -(adv.unsqueeze(1) * logp * mask).sum() / mask.sum()  # plain policy gradient surrogate
    g_pg = torch.autograd.grad(pg, params, allow_unused=True)
    for a, b in zip(g_dapo, g_pg):
        if a is None or b is None:
            assert a is None and b is None
            continue
        assert torch.allclose(a, b, atol=1e-7, rtol=1e-5)


def test_a_dapo_step_with_shared_prompts_is_the_unpacked_step(warm_policy, data):
    """defender.rl.share_prompts: the trainer scores each group after one copy of its prompt
    (models/shared_prompts.py); the same rollouts give the same loss, gradient norm and gradient of
    every trainable parameter (float32 rounding; compared before AdamW's first step, which moves a
    weight by +-lr whatever the size of its gradient, so a near-zero gradient's rounding could flip it)."""
    out, grads = {}, {}
    for share in (False, True):
        policy = copy.deepcopy(warm_policy)
        tr = DefenderTrainer(policy, data[0], _dapo_cfg(steps=1, share_prompts=share))
        assert policy.share_prompts is share
        step = tr.opt.step

        def recorded(*args, _share=share, _step=step, _policy=policy, **kw):
            grads[_share] = {n: p.grad.clone() for n, p in _policy.model.named_parameters() if p.requires_grad}
            return _step(*args, **kw)

        tr.opt.step = recorded
        out[share] = tr.dapo_step()
    assert out[True]["reward"] == out[False]["reward"] and out[True]["loss"] != 0
    assert out[True]["loss"] == pytest.approx(out[False]["loss"], rel=1e-4, abs=1e-7)
    assert out[True]["grad_norm"] == pytest.approx(out[False]["grad_norm"], rel=1e-4)
    assert grads[True].keys() == grads[False].keys() and len(grads[True]) > 50
    assert all(g.abs().max() > 0 for g in grads[True].values())  # every trainable parameter has a gradient
    for n, g in grads[True].items():
        torch.testing.assert_close(g, grads[False][n], rtol=1e-4, atol=1e-6, msg=n)


def test_sft_weight_adds_the_supervised_gradient_to_the_dapo_step(warm_policy, data):
    """``sft_weight`` w: a DAPO step's gradient is DAPO's own (the same rollouts: the supervised
    batch is drawn after them) plus w x the gradient of the answers' mean token NLL on the next
    batch_prompts examples, and the row reports that NLL. w = 0 is DAPO alone."""
    grads, rows = {}, {}
    for w in (0.0, 0.5):
        policy = copy.deepcopy(warm_policy)
        # clipping off: the optimizer sees the raw sum of the two gradients
        tr = DefenderTrainer(policy, data[0], _dapo_cfg(steps=1, sft_weight=w, grad_clip=1e9))
        taken = []
        tr.opt.step = lambda: taken.append(
            {n: q.grad.clone() for n, q in policy.model.named_parameters() if q.grad is not None}
        )
        rows[w] = tr.dapo_step()
        grads[w] = taken[0]
        position = tr.stream.position()
    assert "sft_loss" not in rows[0.0]
    assert rows[0.0]["reward"] == rows[0.5]["reward"] and rows[0.0]["loss"] == pytest.approx(rows[0.5]["loss"], abs=0)

    # The supervised batch by hand: the batch_prompts examples after the DAPO draws.
    assert position["epoch"] == 0 and position["index"] > 8  # rollouts drew first; no epoch ended
    batch = [data[0][i] for i in DataStream(len(data[0]), 0).take(position["index"])[-8:]]
    policy = copy.deepcopy(warm_policy)
    policy.model.train()
    ids, mask = policy.target_ids([f"\\boxed{{{e.answer}}}" for e in batch])
    logp = policy.response_logprobs([e.image for e in batch], [e.prompt for e in batch], ids, mask)
    nll = -(logp * mask).sum() / mask.sum()
    nll.backward()
    assert rows[0.5]["sft_loss"] == pytest.approx(float(nll.detach()), rel=1e-5)
    for n, q in policy.model.named_parameters():
        if q.grad is not None:
            torch.testing.assert_close(grads[0.5][n] - grads[0.0][n], 0.5 * q.grad, rtol=1e-3, atol=1e-6)
    for bad in (_dapo_cfg(sft_weight=-1.0), DefenderTrainConfig(mode="sft", sft_weight=0.5)):
        with pytest.raises(ValueError, match="defender.rl.sft_weight"):
            DefenderTrainer(copy.deepcopy(warm_policy), data[0], bad)


def test_resume_reproduces_the_next_steps_exactly(warm_policy, data, tmp_path):
    straight = copy.deepcopy(warm_policy)
    run = DefenderTrainer(straight, data[0], _dapo_cfg(steps=4))
    run.train()
    first = copy.deepcopy(warm_policy)
    half = DefenderTrainer(first, data[0], _dapo_cfg(steps=4))
    half.train(steps=2)
    half.save(tmp_path / "ckpt")
    torch.manual_seed(12345)  # disturb the global RNG: the checkpoint must restore it
    resumed_policy = QwenVLPolicy.from_pretrained(str(tmp_path / "ckpt"))
    resumed = DefenderTrainer(resumed_policy, data[0], _dapo_cfg(steps=4), resume_from=tmp_path / "ckpt")
    assert resumed.step == 2 and resumed.stream.position() == half.stream.position()
    resumed.train()
    assert resumed.step == 4
    strip = lambda rows: [{k: v for k, v in r.items() if "seconds" not in k} for r in rows]  # noqa: E731
    assert strip(resumed.metrics) == strip(run.metrics)
    for (n, a), b in zip(straight.model.named_parameters(), resumed_policy.model.parameters()):
        assert torch.equal(a, b), n


def test_sft_then_dapo_learns_the_colour_task(data):
    """DAPO after 60 SFT steps raises the held-out probability of the right letter (the dense view:
    greedy accuracy on 128 items moves in steps of whole items and swung 0.00 to +0.23 between
    seeds and scorer versions). Measured on this machine, 80 DAPO steps, model seeds 0 / 1 / 2:
    P(right) 0.37 -> 0.52, 0.44 -> 0.75, 0.28 -> 0.50; greedy accuracy 0.52 -> 0.52, 0.69 -> 0.76,
    0.52 -> 0.51 (chance 0.25); training reward ~0.35 -> ~0.54; about 40 s."""
    train, test = data
    torch.manual_seed(0)
    policy = QwenVLPolicy.tiny(seed=0, spec=SPEC)
    DefenderTrainer(policy, train, DefenderTrainConfig(mode="sft", steps=60, batch_prompts=32, lr=1e-3)).train()

    def p_right() -> float:
        cols = [[getattr(e, k) for e in test] for k in ("image", "prompt", "answer", "num_options")]
        return sum(policy.answer_probability(*cols)) / len(test)

    after_sft = p_right()
    dapo = DefenderTrainer(
        policy,
        train,
        DefenderTrainConfig(
            mode="dapo",
            steps=80,
            batch_prompts=16,
            lr=1e-3,
            max_new_tokens=3,
            micro_batch=80,
            # As the policy sharpens, fewer groups are mixed: late steps need more draws to fill a batch.
            dapo=DapoConfig(group_size=5, max_draw_factor=24),
        ),
    )
    rows = dapo.train()
    final = evaluate(policy, test)
    assert p_right() >= after_sft + 0.1, (after_sft, p_right())
    assert final["accuracy"] >= chance(test) + 0.2, final
    early = sum(r["reward"] for r in rows[:30]) / 30
    late = sum(r["reward"] for r in rows[-30:]) / 30
    assert late > early + 0.1, (early, late)
    assert final["strict_format"] == 1.0


def test_tiny_spec_sets_the_rotary_base_and_vision_window():
    """The image tokens' width section is the last (lowest-frequency) rotary section: at base 1e4
    it turns < 0.002 rad per grid step (position-blind); the spec's base reaches the model."""
    from models.qwen_vl import QwenVLPolicy, TinyDefenderSpec

    blind = QwenVLPolicy.tiny(spec=TinyDefenderSpec()).model
    seeing = QwenVLPolicy.tiny(spec=TinyDefenderSpec(rope_theta=10.0, window_size=64)).model
    width_freqs = lambda m: m.model.language_model.rotary_emb.inv_freq[-5:]  # noqa: E731 (mrope section [6, 5, 5])
    assert float(width_freqs(blind).max()) < 0.002
    assert float(width_freqs(seeing).min()) > 0.1
    assert seeing.config.vision_config.window_size == 64 and blind.config.vision_config.window_size == 32
    # key-value heads (1 by default: the cached warm-ups' weights) and vision heads reach the model
    assert blind.config.text_config.num_key_value_heads == 1 and blind.config.vision_config.num_heads == 2
    mha = QwenVLPolicy.tiny(spec=TinyDefenderSpec(heads=4, kv_heads=4, vision_heads=4)).model
    attn = mha.model.language_model.layers[0].self_attn
    assert attn.k_proj.out_features == attn.q_proj.out_features == 64
    assert mha.config.vision_config.num_heads == 4


def test_warmed_tiny_defender_is_trained_once_and_answers_in_format(tmp_path, monkeypatch, capsys):
    """models.defender {backend: tiny, warmup: {...}}: a short SFT on fresh world scenes turns an
    untrained defender (no parsable answer) into one that answers in the strict format, saying
    how far it is on the way (a line per tenth); the weights are cached and a second load reads
    them instead of training again, silently."""
    from models.qwen_vl import load_policy
    from stages.registry import load
    from stages.warm_defender import world_examples

    monkeypatch.setenv("AOT_CACHE", str(tmp_path))
    spec = {"backend": "tiny", "seed": 0, "min_pixels": 1024, "max_pixels": 4096}
    test = world_examples(48, seed=99)
    assert evaluate(load_policy(spec), test)["unparsed"] == 1.0
    capsys.readouterr()
    warm = load("defender", {**spec, "warmup": {"steps": 20, "scenes": 64}})
    said = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("defender warm-up:")]
    assert [ln.split(",")[0] for ln in said] == [f"defender warm-up: step {s}/20" for s in range(2, 21, 2)]
    assert all(" loss " in ln and ln.endswith(" s left") for ln in said) and said[-1].endswith("~0 s left")
    assert evaluate(warm, test)["strict_format"] == 1.0
    (folder,) = [p for p in (tmp_path / "warm-defenders").iterdir() if p.is_dir()]  # beside it: its build lock
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    from stages.warm_defender import warmed_tiny_defender

    again = warmed_tiny_defender(spec, {"steps": 20, "scenes": 64})  # the cache, not a second training
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    assert "defender warm-up" not in capsys.readouterr().err
    for (n, a), (_, b) in zip(warm.model.state_dict().items(), again.model.state_dict().items()):
        assert torch.equal(a, b), n


def test_learning_rate_warmup_and_cosine_schedule(data):
    """Linear warm-up to lr over lr_warmup_steps, then cosine to 10% of lr at the last step; the
    optimizer runs at the scheduled rate and the metrics log it."""
    import math

    train, _ = data
    cfg = DefenderTrainConfig(
        mode="sft", steps=12, batch_prompts=4, micro_batch=4, lr=1e-3, lr_warmup_steps=2, lr_schedule="cosine"
    )
    tr = DefenderTrainer(QwenVLPolicy.tiny(seed=0, spec=SPEC), train, cfg)
    assert tr.lr_at(0) == pytest.approx(5e-4) and tr.lr_at(1) == pytest.approx(1e-3)
    assert tr.lr_at(2) == pytest.approx(1e-3)  # cosine starts at the peak
    assert tr.lr_at(7) == pytest.approx(1e-3 * (0.1 + 0.45 * (1 + math.cos(math.pi * 0.5))))
    assert tr.lr_at(12) == pytest.approx(1e-4)
    rows = tr.train(steps=3)
    assert [r["lr"] for r in rows] == pytest.approx([tr.lr_at(i) for i in range(3)])
    assert tr.opt.param_groups[0]["lr"] == pytest.approx(tr.lr_at(2))
    flat = DefenderTrainer(QwenVLPolicy.tiny(seed=0, spec=SPEC), train, DefenderTrainConfig(mode="sft", lr=3e-4))
    assert {flat.lr_at(i) for i in (0, 50, 99)} == {3e-4}


def test_warmup_until_target_accuracy_stops_early_and_resumes_done(data, tmp_path):
    """SFT with target_accuracy: held-back examples (never trained on) are scored every
    eval_every steps and training stops once they reach the target; ``steps`` is only the cap.
    Measured here: 0.52 at step 60 on this task (see the learnability test)."""
    train, test = data
    cfg = DefenderTrainConfig(
        mode="sft", steps=300, batch_prompts=32, lr=1e-3, target_accuracy=0.45, eval_every=10, eval_examples=64
    )
    torch.manual_seed(0)
    tr = DefenderTrainer(QwenVLPolicy.tiny(seed=0, spec=SPEC), train, cfg)
    assert len(tr.examples) == len(train) - 64 and {e.id for e in tr.held_back}.isdisjoint(e.id for e in tr.examples)
    rows = tr.train(out_dir=tmp_path / "ck")
    checks = [r for r in rows if "heldback_accuracy" in r]
    assert tr.reached and tr.step < 300 and tr.step % 10 == 0, tr.step
    assert [r["step"] for r in checks] == list(range(10, tr.step + 1, 10))
    assert checks[-1]["heldback_accuracy"] >= 0.45 > max(r["heldback_accuracy"] for r in checks[:-1])
    assert evaluate(tr.policy, test)["accuracy"] >= chance(test) + 0.1  # and it generalizes
    again = DefenderTrainer(QwenVLPolicy.from_pretrained(str(tmp_path / "ck")), train, cfg, resume_from=tmp_path / "ck")
    assert again.reached and again.train() == rows and again.step == tr.step  # a finished warm-up stays finished
    with pytest.raises(ValueError, match="at least twice as many examples"):
        DefenderTrainer(QwenVLPolicy.tiny(seed=0, spec=SPEC), train[:100], cfg)


def test_rollouts_run_in_chunks_of_rollout_batch_and_the_update_in_micro_batches(warm_policy, data):
    policy = copy.deepcopy(warm_policy)
    sizes = {"rollout": [], "update": []}
    rollout, logprobs = policy.rollout, policy.response_logprobs
    policy.rollout = lambda images, *a, **k: sizes["rollout"].append(len(images)) or rollout(images, *a, **k)
    policy.response_logprobs = lambda images, *a, **k: sizes["update"].append(len(images)) or logprobs(images, *a, **k)
    cfg = _dapo_cfg(steps=1, micro_batch=15, rollout_batch=40, dapo=DapoConfig(group_size=5, dynamic_sampling=False))
    DefenderTrainer(policy, data[0], cfg).train()
    assert sizes == {"rollout": [40], "update": [15, 15, 10]}  # 8 prompts x 5 completions
    sizes["rollout"].clear(), sizes["update"].clear()
    DefenderTrainer(policy, data[0], _dapo_cfg(steps=1, micro_batch=15, dapo=cfg.dapo)).train()  # 0: micro_batch
    assert sizes == {"rollout": [15, 15, 10], "update": [15, 15, 10]}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scoring_in_one_piece_gives_the_row_by_row_numbers(data, monkeypatch, dtype):
    """Small scoring logits are normalized in one piece, large ones row by row (ONE_PIECE_LOGITS):
    the same log-probs, entropies and gradients, bit for bit, in float32 and bf16."""
    import models.qwen_vl as qv

    tiny = QwenVLPolicy.tiny(seed=0, spec=SPEC)
    policy = QwenVLPolicy(tiny.model, tiny.processor, dtype=dtype)
    ex = data[0][:6]
    ids, mask = policy.target_ids(["\\boxed{A}", "\\boxed{B} x", "no", "\\boxed{C}", "y", "\\boxed{D}"])
    got = {}
    for limit in (qv.ONE_PIECE_LOGITS, 0):  # 0: every batch row by row
        monkeypatch.setattr(qv, "ONE_PIECE_LOGITS", limit)
        policy.model.zero_grad(set_to_none=True)
        lp, ent = policy.response_logprobs([e.image for e in ex], [e.prompt for e in ex], ids, mask, 0.7, True)
        (lp * mask).sum().backward()
        got[limit] = (lp.detach(), ent, [p.grad.clone() for p in policy.model.parameters() if p.grad is not None])
    (a_lp, a_ent, a_g), (b_lp, b_ent, b_g) = got.values()
    assert a_lp.shape == (6, ids.shape[1]) and torch.equal(a_lp, b_lp) and torch.equal(a_ent, b_ent)
    assert len(a_g) == len(b_g) > 50 and all(torch.equal(x, y) for x, y in zip(a_g, b_g))


def test_scoring_builds_no_kv_cache(data):
    # A log-prob forward decodes nothing: a KV cache would copy every layer's keys and values
    # (without gradient checkpointing nothing else drops it).
    from transformers.cache_utils import Cache

    policy = QwenVLPolicy.tiny(seed=0, spec=SPEC)
    policy.model.train()
    seen = []
    layer = policy.model.model.language_model.layers[0]
    hook = layer.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(
            [type(v).__name__ for v in list(args) + list(kwargs.values()) if isinstance(v, Cache)]
        ),
        with_kwargs=True,
    )
    ids, mask = policy.target_ids(["\\boxed{A}", "\\boxed{B}"])
    policy.response_logprobs([e.image for e in data[0][:2]], [e.prompt for e in data[0][:2]], ids, mask)
    hook.remove()
    assert seen == [[]]


def test_a_warmed_stage2_defender_learns_the_runs_world(monkeypatch):
    """models.defender.warmup trains on the run's world (its source config), not the default one:
    PipelineConfig.model_spec puts the world into the spec, so a changed world is also a new cache entry."""
    import dataclasses

    import stages.registry as models
    from config import RUN_ONLY_SOURCE_FIELDS, config_from_dict, load_config
    from stages.base import ShardContext
    from stages.warm_defender import world_examples

    seen = {}
    monkeypatch.setattr(models, "load", lambda role, spec: seen.setdefault(role, spec))
    cfg = load_config(
        "synthetic",
        {
            "models": {"defender": {"backend": "tiny", "warmup": {"steps": 7}}},
            "source": {"question_types": ["colour"], "question_weights": [1.0]},
        },
    )
    ShardContext("implant", cfg, 0).model("defender")
    warm = seen["defender"]["warmup"]
    world = {k: v for k, v in dataclasses.asdict(cfg.source).items() if k not in RUN_ONLY_SOURCE_FIELDS}
    assert warm["steps"] == 7 and warm["source"] == world and world["question_types"] == ["colour"]
    assert cfg.model_spec("defender") == seen["defender"]  # the one resolution `aot eval` uses too
    # How many scenes a run draws, and under which seed, is not the world: the warm-up is reused.
    other = load_config(
        "synthetic",
        {
            "models": {"defender": {"backend": "tiny", "warmup": {"steps": 7}}},
            "source": {
                "question_types": ["colour"],
                "question_weights": [1.0],
                "num_scenes": 8,
                "seed": 5,
                "shard_size": 4,
            },
        },
    )
    assert other.model_spec("defender") == cfg.model_spec("defender")
    prompts = [e.prompt for e in world_examples(6, 0, config_from_dict({"source": warm["source"]}))]
    assert all("colour" in p for p in prompts), prompts
    assert not all("colour" in e.prompt for e in world_examples(12, 0))  # the default world asks more than colour


def test_extended_warmup_examples_are_the_scenes_on_canvases_stage_1_would_paint():
    """warmup.canvas_scale: each warm-up scene on a canvas 1-2x its side with the source pixels
    unchanged at its centre; a scene is skipped exactly when the border shows a second object of
    a target's name (Stage 1's duplication check: its answer would be ambiguous); and a scene's
    canvas does not depend on how many scenes are drawn."""
    import json

    import numpy as np

    from models.synthetic import SceneJudge, SceneOutpainter
    from stages.extend import canvas_geometry
    from stages.registry import resolve_config
    from stages.source import NoQuestion, scene_row
    from stages.warm_defender import extended_examples, world_examples
    from storage import decode_image

    cfg = resolve_config("synthetic", [])
    few, many = extended_examples(6, 3, cfg, [1.0, 2.0]), world_examples(40, 3, cfg, [1.0, 2.0])
    assert [(e.id, e.image.tobytes()) for e in few] == [(e.id, e.image.tobytes()) for e in many[:6]]
    sides = [e.image.width for e in many]
    assert min(sides) >= 128 and max(sides) <= 256 and len(set(sides)) > 15, sides
    kept = {int(e.id.rsplit("-", 1)[1]): e for e in many}
    skipped = 0
    for i in range(max(kept) + 1):
        try:
            row = scene_row(3, i, cfg)
        except NoQuestion:
            continue
        src = decode_image(row["image"]).convert("RGB")
        scale = np.random.default_rng([3, i, 17]).uniform(1.0, 2.0)  # drawn per scene, as documented
        canvas, (x, y), _ = canvas_geometry(src.width, src.height, scale, max_pixels=1 << 62)
        painted = SceneOutpainter(seam_rate=0.0).outpaint(src, canvas, (x, y), json.loads(row["scene"]))
        box = [x, y, x + src.width, y + src.height]
        unique = SceneJudge().check_duplication(painted.image, row["target_names"], box, painted.context).passed
        assert (i in kept) == unique, i
        skipped += not unique
        if i in kept:
            e = kept[i]
            assert e.image.size == canvas and e.answer == row["answer"] and row["question"] in e.prompt
            assert np.array_equal(np.asarray(e.image)[y : y + src.height, x : x + src.width], np.asarray(src))
    assert skipped >= 1  # the duplication check had something to skip here


def test_answer_probability_is_a_distribution_over_the_options_led_by_the_greedy_letter(warm_policy, data):
    """Summed over every letter as the answer, the probabilities are 1 and a letter outside the
    options gets 0; after SFT the most probable letter is the greedy answer's wherever that answer
    is well-formed (every option shares the prefix '\\boxed{'), and the right letter's mean
    probability is above chance."""
    from models.mcq import extract_choice

    ex = data[1][:16]
    n = [e.num_options for e in ex]
    letters = [chr(65 + k) for k in range(max(n))]
    args = ([e.image for e in ex], [e.prompt for e in ex])
    per_letter = [warm_policy.answer_probability(*args, [L] * len(ex), n) for L in letters]
    assert [sum(p[i] for p in per_letter[: n[i]]) for i in range(len(ex))] == [pytest.approx(1.0, abs=1e-6)] * len(ex)
    assert warm_policy.answer_probability(args[0][:1], args[1][:1], ["Z"], n[:1]) == [0.0]
    greedy = warm_policy.generate(*args, max_new_tokens=3)
    checked = 0
    for i, text in enumerate(greedy):
        letter = extract_choice(text, n[i]).letter
        if letter is not None and text.strip() == f"\\boxed{{{letter}}}":
            assert letters[max(range(n[i]), key=lambda k: per_letter[k][i])] == letter, text
            checked += 1
    assert checked >= len(ex) // 2  # the warm policy answers in format
    right = warm_policy.answer_probability(*args, [e.answer for e in ex], n)
    assert sum(right) / len(right) > chance(ex)


def test_dynamic_sampling_filters_on_accuracy_not_reward(warm_policy, data, monkeypatch):
    """A group whose answers are all right but mixed in format (rewards 1.0 and 0.8) has no accuracy
    signal: DAPO's filter (on accuracy, as the paper's) drops it; a group mixed in accuracy is kept."""
    from models.qwen_vl import Rollout
    from rl.dapo import keep_groups

    ex = data[0][:2]
    answer = {id(e.image): e.answer for e in ex}
    wrong = {e.answer: next(L for L in "ABCDEF" if L != e.answer) for e in ex}

    def scripted(images, prompts, **kw):
        texts = []
        for j, im in enumerate(images):
            right = answer[id(im)]
            if id(im) == id(ex[0].image):  # group 0: right 5 times, every other one lower-case
                texts.append(f"\\boxed{{{right.lower() if j % 2 else right}}}")
            else:  # group 1: right every other time
                texts.append(f"\\boxed{{{right if j % 2 else wrong[right]}}}")
        n = len(images)
        ids, mask, truncated = torch.ones(n, 2, dtype=torch.long), torch.ones(n, 2), torch.zeros(n, dtype=torch.bool)
        return Rollout(list(prompts), list(images), ids, mask, truncated, texts)

    tr = DefenderTrainer(copy.deepcopy(warm_policy), ex, _dapo_cfg(batch_prompts=2, micro_batch=5))
    monkeypatch.setattr(tr.policy, "rollout", scripted)
    groups = tr._draw(0)
    assert sorted(set(groups[0].rewards.tolist())) == [pytest.approx(0.8), 1.0] and groups[0].scores == [1.0] * 5
    assert groups[1].scores == [0.0, 1.0, 0.0, 1.0, 0.0]
    assert keep_groups(torch.tensor(groups[0].scores + groups[1].scores), 5, 0.01, 0.99).tolist() == [False, True]


def test_step_progress_says_a_line_per_tenth_with_the_mean_loss_and_time_left():
    from models.progress import StepProgress

    now = [0.0]
    p = StepProgress("fit", 20, clock=lambda: now[0])
    said = []
    for step in range(1, 21):
        now[0] = 3.0 * step  # 3 s a step
        said.append(p(step, float(step)))
    lines = [s for s in said if s]
    assert len(lines) == 10 and said[0] is None
    assert lines[0] == "fit: step 2/20, loss 1.5000, 6 s, ~54 s left"  # mean of steps 1-2; 18 steps x 3 s
    assert lines[-1] == "fit: step 20/20, loss 19.5000, 60 s, ~0 s left"
    odd = StepProgress("x", 7, clock=lambda: 0.0)
    assert [s for s in range(1, 8) if odd(s)] == list(range(1, 8))  # fewer steps than lines: every step
    jumps = StepProgress("x", 40, clock=lambda: 0.0, unit="answer")  # a batch at a time: once per tenth crossed
    assert [n for n in (3, 7, 8, 9, 15, 16, 40) if jumps(n)] == [7, 8, 15, 16, 40]


def test_the_embedded_defaults_stage2_defender_ships_with_the_code(tmp_path, monkeypatch):
    """The synthetic preset's warmed Stage 2 defender ships in models/fitted/warm-defender
    (experiments/ship_fits.py), named by its warm-up key without machine and code: a fresh cache
    loads it without training (nothing written), with the shipped weights, and it answers fresh
    world scenes in the format well above chance. With ``AOT_NO_SHIPPED_FITS`` it is not found."""
    import json

    from models.cache import SHIPPED_FITS, shipped_fit, shipped_fit_path
    from stages.registry import load, resolve_config
    from stages.warm_defender import KEY_FILE, SHIPPED_KIND, world_examples

    shipped = sorted((SHIPPED_FITS / SHIPPED_KIND).glob(f"*/{KEY_FILE}"))
    assert shipped, "no shipped warm defender: run experiments/ship_fits.py --parts defender"
    for f in shipped:  # the name is the key's: a folder cannot answer for another warm-up
        assert f.parent == shipped_fit_path(SHIPPED_KIND, json.loads(f.read_text()), ""), f

    monkeypatch.setenv("AOT_CACHE", str(tmp_path))
    monkeypatch.delenv("AOT_NO_SHIPPED_FITS", raising=False)
    cfg = resolve_config("synthetic")
    policy = load("defender", cfg.model_spec("defender"))
    assert not list(tmp_path.rglob("*"))  # nothing trained or cached
    state = policy.model.state_dict()

    def same(folder) -> bool:
        other = QwenVLPolicy.from_pretrained(str(folder)).model.state_dict()
        return other.keys() == state.keys() and all(torch.equal(state[n], t) for n, t in other.items())

    assert any(same(f.parent) for f in shipped), (
        "the preset's Stage 2 defender is no shipped warm-up (its spec or warm-up changed? rerun ship_fits.py)"
    )

    test = world_examples(60, seed=123_456, cfg=cfg)
    scores = evaluate(policy, test)
    assert scores["strict_format"] == 1.0
    assert scores["accuracy"] >= 2 * chance(test), scores

    monkeypatch.setenv("AOT_NO_SHIPPED_FITS", "1")
    assert shipped_fit(SHIPPED_KIND, json.loads(shipped[0].read_text()), "") is None


def _decoding_batch(data):
    """Left-padded prompts of six lengths, one image used twice: every place a position can go wrong."""
    exs = data[1][:6]
    images = [e.image for e in exs] + [exs[0].image]
    prompts = [e.prompt + " Look closely." * i for i, e in enumerate(exs)] + [exs[0].prompt]
    return images, prompts


def _same_rollouts(policy, images, prompts, temperature):
    kw = dict(temperature=temperature, max_new_tokens=10, seed=5)
    ref = policy.rollout(images, prompts, cache="dynamic", **kw)
    got = policy.rollout(images, prompts, cache="loop", **kw)
    n = ref.response_ids.shape[1]  # generate stops when every row has ended; the loop looks every 16 tokens
    assert got.texts == ref.texts and torch.equal(got.truncated, ref.truncated)
    assert torch.equal(got.response_mask[:, :n], ref.response_mask) and not got.response_mask[:, n:].any()
    assert torch.equal(got.response_ids[:, :n], ref.response_ids)
    return ref


def _sharp_policy():
    """A tiny defender whose attention is sharp (queries and keys scaled up, rotary base 10): a random
    tiny model attends almost uniformly, and its logits move by 0.005 when every position is off by
    1000, so it would hide a wrong position or mask."""
    policy = QwenVLPolicy.tiny(seed=0, spec=dataclasses.replace(SPEC, rope_theta=10.0))
    with torch.no_grad():
        for name, w in policy.model.named_parameters():
            if "language_model" in name and name.endswith(("q_proj.weight", "k_proj.weight")):
                w.mul_(12.0)
    return policy


def test_our_decoding_loop_scores_each_token_as_the_scorer_does(data, monkeypatch):
    """Every step's log-probabilities of the sampled token, from the loop's incremental forwards
    over the static cache, equal the scorer's (one forward over prompt and response, the log-probs
    DAPO trains on) to 1e-4 in float32: positions, the prepared attention mask and the cache are
    checked token by token, not only through which token won."""
    import models.decoding as decoding

    policy = _sharp_policy()
    images, prompts = _decoding_batch(data)
    steps, sample = [], decoding.next_tokens
    monkeypatch.setattr(
        decoding, "next_tokens", lambda logits, *a: steps.append(logits.float().clone()) or sample(logits, *a)
    )
    roll = policy.rollout(images, prompts, temperature=1.0, max_new_tokens=10, seed=5, cache="loop")
    ids = roll.response_ids
    ours = torch.stack(
        [torch.log_softmax(x.index_fill(1, torch.tensor(policy.suppressed), float("-inf")), -1) for x in steps], 1
    )  # (B, T, vocab)
    ours = ours.gather(2, ids.unsqueeze(2)).squeeze(2)
    ref = policy.response_logprobs(images, prompts, ids, roll.response_mask).detach()
    m = roll.response_mask.bool()
    assert m.sum() >= 40 and torch.allclose(ours[m], ref[m], atol=1e-4), (ours[m] - ref[m]).abs().max()


def test_our_decoding_loop_samples_what_generate_samples(data):
    """models/decoding.py against transformers' generate, sampled at temperature 1: the same tokens
    (on the CPU both draw torch.multinomial from a generator seeded alike), which holds only if every
    step's logits match (on the position-sensitive model)."""
    policy = _sharp_policy()
    images, prompts = _decoding_batch(data)
    _same_rollouts(policy, images, prompts, 1.0)
    with pytest.raises(ValueError, match="dynamic, static, loop, graph"):
        policy.rollout(images, prompts, cache="paged")
    if not torch.cuda.is_available():  # a CUDA graph needs CUDA: said, not silently eager
        with pytest.raises(ValueError, match="'graph' on CUDA only"):
            policy.rollout(images, prompts, cache="graph")


def test_inverse_cdf_sampling_follows_the_distribution_and_never_draws_a_token_of_no_mass():
    """Uniforms spread evenly over [0, 1) land on each token in proportion to its probability;
    a zero-probability token (a suppressed one) is never drawn, not at u = 0 nor near 1."""
    from models.decoding import inverse_cdf

    probs = torch.tensor([[0.0, 0.2, 0.0, 0.5, 0.3, 0.0]]).expand(1000, 6)
    u = (torch.arange(1000) + 0.5) / 1000
    counts = torch.bincount(inverse_cdf(probs, u), minlength=6)
    assert counts.tolist() == [0, 200, 0, 500, 300, 0]
    edges = torch.tensor([0.0, 1 - 2**-53, 0.2000001, 0.9999], dtype=torch.float64)
    assert inverse_cdf(probs[:4], edges).tolist() == [1, 4, 3, 4]
    assert inverse_cdf(probs[:1], torch.ones(1)).tolist() == [4]  # u = 1 (float32 rounding): the last token with mass


def test_each_row_samples_from_its_own_seed_as_it_would_alone(data):
    """generate(..., seeds=): a row's sampled answer is the one it gets alone under its seed, whoever
    shares its batch (the attacker reward's K queries and the curriculum score many images per
    call); different seeds give different samples; greedy ignores seeds."""
    policy = _sharp_policy()
    images, prompts = _decoding_batch(data)
    kw = dict(temperature=1.0, max_new_tokens=6)
    for k in (0, 1):
        alone = [policy.rollout([im], [p], seeds=[k], **kw).response_ids[0] for im, p in zip(images, prompts)]
        batch = policy.rollout(images, prompts, seeds=[k] * len(images), **kw).response_ids
        for row, ids in zip(batch, alone):
            assert torch.equal(row[: len(ids)], ids) and not row[len(ids) :].ne(policy.tokenizer.pad_token_id).any()
        swapped = policy.rollout(images[::-1], prompts[::-1], seeds=[k] * len(images), **kw).response_ids
        assert torch.equal(swapped.flip(0)[:, : batch.shape[1]], batch[:, : swapped.shape[1]])
    one = policy.rollout(images, prompts, seeds=[0] * len(images), **kw).texts
    other = policy.rollout(images, prompts, seeds=[7] * len(images), **kw).texts
    assert one != other
    greedy = dict(temperature=0.0, max_new_tokens=6)
    assert (
        policy.rollout(images, prompts, seeds=[3] * 7, **greedy).texts
        == policy.rollout(images, prompts, **greedy).texts
    )
    with pytest.raises(ValueError, match="one per row"):
        policy.rollout(images, prompts, seeds=[0], **kw)


def test_our_decoding_loop_answers_and_ends_as_generate_does(warm_policy, data):
    """Greedy, from the warmed defender: answers that differ by row and end in EOS, the same as
    generate's (texts, masks, truncation)."""
    ref = _same_rollouts(warm_policy, *_decoding_batch(data), 0.0)
    assert len(set(ref.texts)) > 1 and not ref.truncated.any()


def test_our_decoding_loop_stops_once_every_row_has_ended(warm_policy, data):
    from models.decoding import decode

    images, prompts = _decoding_batch(data)
    policy = warm_policy
    enc, inverse = policy.encode(images, prompts)
    kw = dict(temperature=0.0, suppressed=policy.suppressed, seed=0)
    kw |= dict(eos_token_id=policy.tokenizer.eos_token_id, pad_token_id=policy.tokenizer.pad_token_id)
    policy.model.eval()
    with repeated_images(policy.model, inverse):
        full = decode(policy.model, enc, max_new_tokens=24, check_every=100, **kw)
        early = decode(policy.model, enc, max_new_tokens=24, check_every=1, **kw)
    ends = (full == policy.tokenizer.eos_token_id).int().argmax(1)  # every row ends (greedy, warmed)
    assert full.shape[1] == 24 and early.shape[1] == int(ends.max()) + 1
    assert torch.equal(early, full[:, : early.shape[1]])
    after = torch.arange(24).unsqueeze(0) > ends.unsqueeze(1)
    assert (full[after] == policy.tokenizer.pad_token_id).all()  # finished rows are fed and given pads


@pytest.mark.gpu
def test_graph_decoding_gives_the_compiled_loops_tokens_on_cuda(data):
    """On a card: the step captured as one CUDA graph decodes what the loop's compiled step decodes,
    greedy and sampled (same seed), on the position-sensitive model; no capture fallback warning."""
    import warnings

    policy = _sharp_policy()
    policy.model.to("cuda")
    policy.device = "cuda"
    images, prompts = _decoding_batch(data)
    for temperature in (0.0, 1.0):
        kw = dict(temperature=temperature, max_new_tokens=24, seed=5)
        ref = policy.rollout(images, prompts, cache="loop", **kw)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            got = policy.rollout(images, prompts, cache="graph", **kw)
        assert got.texts == ref.texts and torch.equal(got.response_ids, ref.response_ids)
