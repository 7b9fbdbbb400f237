"""The decoding step's packed grouped-query attention (models/text_attention.py) against
transformers' SDPA path, which copies each key-value head once per query head."""

from __future__ import annotations

import types

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from models import text_attention
from models.text_attention import packed_gqa_attention, set_text_attention


def _inputs(dtype, q_len=1, b=3, heads=8, kv=2, slots=12, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, heads, q_len, dim, generator=g).to(dtype)
    k = torch.randn(b, kv, slots, dim, generator=g).to(dtype)
    v = torch.randn(b, kv, slots, dim, generator=g).to(dtype)
    mask = torch.ones(b, 1, q_len, slots, dtype=torch.bool)
    mask[0, ..., :3] = False  # left pads
    mask[1, ..., -4:] = False  # static-cache slots not written yet
    return types.SimpleNamespace(num_key_value_groups=heads // kv, is_causal=True), q, k, v, mask


def _reference(module, q, k, v, mask):
    """Attention by hand, each query head h on key-value head h // groups."""
    groups = module.num_key_value_groups
    k, v = k.repeat_interleave(groups, 1).float(), v.repeat_interleave(groups, 1).float()
    s = q.float() @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    s = s.masked_fill(~mask, float("-inf"))
    return (s.softmax(-1) @ v).transpose(1, 2)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_one_token_matches_the_repeated_heads(dtype, tol):
    module, q, k, v, mask = _inputs(dtype)
    packed, _ = packed_gqa_attention(module, q, k, v, mask, scaling=q.shape[-1] ** -0.5)
    stock, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=q.shape[-1] ** -0.5)
    assert packed.shape == stock.shape == (3, 1, 8, 16) and packed.dtype == dtype
    torch.testing.assert_close(packed.float(), _reference(module, q, k, v, mask), atol=tol, rtol=tol)
    torch.testing.assert_close(packed.float(), stock.float(), atol=tol, rtol=tol)


def test_several_tokens_are_transformers_own():
    module, q, k, v, mask = _inputs(torch.float32, q_len=5)
    packed, _ = packed_gqa_attention(module, q, k, v, mask, scaling=0.25)
    stock, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.25)
    assert torch.equal(packed, stock)


def test_rollouts_take_the_packed_path_and_sample_the_same_tokens(monkeypatch):
    from PIL import Image

    from models.qwen_vl import QwenVLPolicy, TinyDefenderSpec

    policy = QwenVLPolicy.tiny(seed=0, spec=TinyDefenderSpec(heads=4, kv_heads=1))
    assert policy.model.config.text_config._attn_implementation == text_attention.NAME
    images = [Image.new("RGB", (64, 64), c) for c in ("red", "blue", "green")]
    prompts = ["What colour is the cube?", "Which one is left?", "Name the shape."]
    shapes = {"packed": [], "stock": []}
    sdpa = torch.nn.functional.scaled_dot_product_attention
    mode = None

    def counted(q, *a, **kw):  # every SDPA call's query shape, per mode (vision tower's included)
        shapes[mode].append(tuple(q.shape))
        return sdpa(q, *a, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counted)
    # as inside torch.compile (the decoding step on a GPU), where transformers' SDPA path repeats the
    # key-value heads even for one token (eagerly, versions since ~5.2x pack it as we do; 5.17, the
    # GPU image's, never does)
    import transformers.integrations.sdpa_attention as hf_sdpa

    monkeypatch.setattr(hf_sdpa, "is_torchdynamo_compiling", lambda: True, raising=False)
    runs = {}
    for mode in ("packed", "stock"):
        set_text_attention(policy.model, mode)
        for temperature in (0.0, 1.0):
            r = policy.rollout(images, prompts, temperature=temperature, max_new_tokens=6, cache="loop", seed=5)
            runs[mode, temperature] = r.response_ids
    # a decoding step's query: packed, 4 query heads as the rows of the one key-value head; stock, 4 heads x 1 token
    assert sum(s[1:3] == (1, 4) for s in shapes["packed"]) >= 2 * 2 * 5  # 2 rollouts x 2 layers x 5 steps
    assert not any(s[1:3] == (4, 1) for s in shapes["packed"])
    assert sum(s[1:3] == (4, 1) for s in shapes["stock"]) >= 2 * 2 * 5
    for temperature in (0.0, 1.0):
        assert torch.equal(runs["packed", temperature], runs["stock", temperature])


def test_only_sdpa_models_switch():
    model = types.SimpleNamespace(config=types.SimpleNamespace(_attn_implementation="eager"))
    assert set_text_attention(model, "packed") is False
    assert model.config._attn_implementation == "eager"
    with pytest.raises(ValueError, match="text_attention must be one of"):
        set_text_attention(model, "fast")
