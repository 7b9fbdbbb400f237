"""Grouped window attention (models/vision_attention.py) is the stock per-window loop, batched:
the same log-probs and the same gradients, for grids whose windows are all alike and for grids
with smaller edge windows."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from models.qwen_vl import QwenVLPolicy, TinyDefenderSpec
from models.vision_attention import set_vision_attention


def _logp_and_grads(policy, images, prompts, ids, mask):
    policy.model.zero_grad(set_to_none=True)
    logp = policy.response_logprobs(images, prompts, ids, mask)
    (logp * mask).sum().backward()
    grads = {n: p.grad.clone() for n, p in policy.model.named_parameters() if p.grad is not None}
    return logp.detach(), grads


@pytest.mark.parametrize("size", [(64, 64), (80, 48)])  # 2x2 equal windows; 3x2 windows with short edges
def test_grouped_window_attention_equals_the_stock_loop(size):
    # window 32 px = 4 patches of 8 = 2x2 merged units: 64x64 -> four equal windows; 80x48 -> edge windows
    spec = TinyDefenderSpec(window_size=32, min_pixels=16 * 16, max_pixels=128 * 128, vision_depth=2)
    policy = QwenVLPolicy.tiny(seed=0, spec=spec, vision_attention="stock")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(2)]
    prompts = ["What colour is the square?", "Where is the circle?"]
    ids, mask = policy.target_ids(["\\boxed{A}", "\\boxed{B}"])
    stock_lp, stock_g = _logp_and_grads(policy, images, prompts, ids, mask)
    assert set_vision_attention(policy.model, "grouped") == spec.vision_depth
    lp, g = _logp_and_grads(policy, images, prompts, ids, mask)
    torch.testing.assert_close(lp, stock_lp, rtol=1e-5, atol=1e-5)
    assert g.keys() == stock_g.keys() and any("visual" in n for n in g)
    for n in g:
        torch.testing.assert_close(g[n], stock_g[n], rtol=1e-4, atol=1e-6, msg=n)
    assert set_vision_attention(policy.model, "stock") == spec.vision_depth  # and back
    torch.testing.assert_close(policy.response_logprobs(images, prompts, ids, mask).detach(), stock_lp)


def test_unknown_vision_attention_mode_names_the_choices():
    with pytest.raises(ValueError, match="stock.*grouped"):
        set_vision_attention(torch.nn.Linear(1, 1), "fast")


def test_the_config_spec_selects_it_and_the_stage_keeps_it_for_loaded_versions():
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLVisionAttention

    from config import load_config
    from models.qwen_vl import load_policy
    from stages.defender import defender_runtime

    def grouped(policy):
        return [("forward" in m.__dict__) for m in policy.model.modules() if isinstance(m, Qwen2_5_VLVisionAttention)]

    assert grouped(load_policy({"backend": "tiny", "vision_attention": "grouped"})) == [True, True]
    assert grouped(load_policy({"backend": "tiny"})) == [True, True]  # the default
    assert grouped(load_policy({"backend": "tiny", "vision_attention": "stock"})) == [False, False]
    cfg = load_config("synthetic", {"defender": {"model": {"backend": "tiny", "vision_attention": "stock"}}})
    assert defender_runtime(cfg) == {
        "device": "cpu",
        "vision_attention": "stock",
        "image_device": None,
        "text_attention": "packed",  # the language model's decoding attention (models/text_attention.py)
    }
    assert defender_runtime(load_config("synthetic", {}))["vision_attention"] == "grouped"
    # the image processor's placement travels the same way (a runtime option, like the device)
    cfg = load_config("synthetic", {"defender": {"model": {"backend": "tiny", "image_device": "cpu"}}})
    assert defender_runtime(cfg)["image_device"] == "cpu"
    assert load_policy({"backend": "tiny", "image_device": "cpu"}).image_device == "cpu"
    assert load_policy({"backend": "tiny"}).image_device is None
    # and so does the language model's attention
    cfg = load_config("synthetic", {"defender": {"model": {"backend": "tiny", "text_attention": "stock"}}})
    assert defender_runtime(cfg)["text_attention"] == "stock"
    assert (
        load_policy({"backend": "tiny", "text_attention": "stock"}).model.config.text_config._attn_implementation
        == "sdpa"
    )
