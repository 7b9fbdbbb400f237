"""Rows that repeat an image (a GRPO group) run the processor and the vision tower once per
distinct image (models/shared_images.py): log-probs, gradients and sampled responses equal those
of the same batch with every image a separate copy (the plain path)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from models.qwen_vl import QwenVLPolicy
from models.shared_images import distinct_rows


def test_distinct_rows_maps_every_row_to_its_first_occurrence():
    keys = ["a", "b", "a", "c", "b", "a"]
    first, inverse = distinct_rows(keys)
    assert first == [0, 1, 3] and inverse == [0, 1, 0, 2, 1, 0]
    assert [keys[first[j]] for j in inverse] == keys


def _batch():
    rng = np.random.default_rng(3)
    a, b, c = (Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)) for _ in range(3))
    # two groups of 3 (same object, same prompt), then a row whose image repeats under another prompt
    images = [a, a, a, b, b, b, a]
    prompts = ["Where is the circle?"] * 3 + ["What colour is the square?"] * 3 + ["How many shapes?"]
    return images, prompts, c


def _logp_and_grads(policy, images, prompts, ids, mask):
    policy.model.zero_grad(set_to_none=True)
    logp = policy.response_logprobs(images, prompts, ids, mask)
    (logp * mask * torch.arange(1, 1 + len(images)).unsqueeze(1)).sum().backward()  # rows weighted differently
    return logp.detach(), {n: p.grad.clone() for n, p in policy.model.named_parameters() if p.grad is not None}


def test_shared_images_give_the_log_probs_and_gradients_of_separate_copies():
    policy = QwenVLPolicy.tiny(seed=0)
    images, prompts, _ = _batch()
    enc, inverse = policy.encode(images, prompts)
    assert inverse == [0, 0, 0, 1, 1, 1, 2]  # (image, prompt) pairs: 3 distinct rows
    per_image = int(enc["image_grid_thw"][0].prod())
    assert enc["pixel_values"].shape[0] == 3 * per_image and enc["input_ids"].shape[0] == 7
    ids, mask = policy.target_ids(["\\boxed{A}", "\\boxed{B} yes", "\\boxed{C}", "\\boxed{A}", "no", "\\boxed{D}", "x"])
    seen = []  # patches the vision tower is given per call
    hook = policy.model.model.visual.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    shared_lp, shared_g = _logp_and_grads(policy, images, prompts, ids, mask)
    copies = [im.copy() for im in images]  # distinct objects: the plain path, one vision pass per row
    assert policy.encode(copies, prompts)[1] == list(range(7))
    lp, g = _logp_and_grads(policy, copies, prompts, ids, mask)
    hook.remove()
    assert seen == [3 * per_image, 7 * per_image]
    torch.testing.assert_close(shared_lp, lp, rtol=1e-5, atol=1e-5)
    assert g.keys() == shared_g.keys() and any("visual" in n for n in g)
    for n in g:
        torch.testing.assert_close(shared_g[n], g[n], rtol=1e-4, atol=1e-6, msg=n)
    inner = policy.model.model
    assert "get_image_features" not in inner.__dict__  # the wrapper is gone after the call


def test_shared_images_under_a_lora_wrapper():
    # peft puts the generation model two levels down: the wrapper must still reach the module
    # whose forward asks for image features (a miss feeds the vision tower mismatched grids)
    from peft import LoraConfig, get_peft_model

    policy = QwenVLPolicy.tiny(seed=0)
    policy.model = get_peft_model(
        policy.model, LoraConfig(r=4, lora_alpha=8, target_modules=r".*language_model.*\.q_proj")
    )
    images, prompts, _ = _batch()
    ids, mask = policy.target_ids(["\\boxed{A}"] * 7)
    shared_lp, shared_g = _logp_and_grads(policy, images, prompts, ids, mask)
    lp, g = _logp_and_grads(policy, [im.copy() for im in images], prompts, ids, mask)
    torch.testing.assert_close(shared_lp, lp, rtol=1e-5, atol=1e-5)
    assert g.keys() == shared_g.keys() and all("lora" in n for n in g)
    for n in g:
        torch.testing.assert_close(shared_g[n], g[n], rtol=1e-4, atol=1e-6, msg=n)


def test_shared_images_sample_the_same_responses():
    policy = QwenVLPolicy.tiny(seed=1)
    images, prompts, _ = _batch()
    for temperature in (0.0, 1.0):
        shared = policy.rollout(images, prompts, temperature=temperature, max_new_tokens=6, seed=5)
        plain = policy.rollout([im.copy() for im in images], prompts, temperature=temperature, max_new_tokens=6, seed=5)
        assert torch.equal(shared.response_ids, plain.response_ids) and shared.texts == plain.texts
