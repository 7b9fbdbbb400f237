"""Rows that repeat a prompt (a GRPO group's completions) scored as one packed row, the prompt once
(models/shared_prompts.py): the packed layout by hand, and log-probs and gradients equal to the
unpacked rows' on the tiny defender — float32 to rounding, bf16 within its precision."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from models.qwen_vl import QwenVLPolicy
from models.shared_prompts import additive_mask, pack_groups


def test_pack_groups_lays_out_each_prompt_once_with_its_completions():
    # 3 rows, P = 4 (left-padded), T = 2: rows 0 and 2 share a prompt of 3 real tokens, row 1 has 4
    ids = torch.tensor([[0, 11, 12, 13, 21, 22], [14, 15, 16, 17, 31, 32], [0, 11, 12, 13, 41, 42]])
    attn = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]])
    kinds = (ids == 12).long()  # an "image" token
    position = torch.arange(6).expand(3, 3, 6) * 10 + torch.arange(3)[:, None, None]  # distinct per axis
    pk = pack_groups(ids, attn, kinds, position, 2, [0, 1, 0], pad_id=0)
    assert pk.ids.tolist() == [[11, 12, 13, 21, 22, 41, 42], [14, 15, 16, 17, 31, 32, 0]]
    assert pk.kinds.tolist() == [[0, 1, 0, 0, 0, 0, 0], [0] * 7]
    assert pk.position[1, 0].tolist() == [11, 21, 31, 41, 51, 41, 51]  # each token at its own row's place
    a = pk.allowed[0].int().tolist()
    assert a[0] == [1, 0, 0, 0, 0, 0, 0] and a[2] == [1, 1, 1, 0, 0, 0, 0]
    assert a[3] == [1, 1, 1, 1, 0, 0, 0] and a[4] == [1, 1, 1, 1, 1, 0, 0]  # first completion
    assert a[5] == [1, 1, 1, 0, 0, 1, 0] and a[6] == [1, 1, 1, 0, 0, 1, 1]  # second: not the first's tokens
    assert pk.allowed[1, 6].int().tolist() == [0] * 6 + [1]  # padding sees itself only
    assert pk.row_of.tolist() == [0, 1, 0] and pk.prompt_rows == [0, 1]
    # logits predicting each response token: the prompt's last token, then the completion's own
    cols = pk.keep.tolist()
    assert [[cols[k] for k in row] for row in pk.take.tolist()] == [[2, 3], [3, 4], [2, 5]]
    m = additive_mask(pk.allowed, torch.float32)
    assert m.shape == (2, 1, 7, 7) and m[0, 0, 5, 3] == torch.finfo(torch.float32).min and m[0, 0, 5, 2] == 0


def _batch():
    rng = np.random.default_rng(5)
    a, b = (Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)) for _ in range(2))
    # two groups (3 and 2 completions), a row alone, and a's image again under another prompt
    images = [a, a, a, b, b, a, b]
    prompts = ["Where is the circle?"] * 3 + ["What colour is the square?"] * 2 + ["How many?", "Is it red?"]
    texts = ["\\boxed{A}", "\\boxed{B} yes it is", "no", "\\boxed{C}", "\\boxed{D} x", "\\boxed{A}", "y"]
    return images, prompts, texts


def _logp_and_grads(policy, images, prompts, ids, mask, packed: bool):
    policy.share_prompts = packed
    policy.model.zero_grad(set_to_none=True)
    logp = policy.response_logprobs(images, prompts, ids, mask)
    (logp * mask.to(logp.dtype) * torch.arange(1, 1 + len(images)).unsqueeze(1)).sum().backward()
    return logp.detach().float(), {n: p.grad.float() for n, p in policy.model.named_parameters() if p.grad is not None}


def test_shared_prompts_give_the_log_probs_and_gradients_of_the_unpacked_rows():
    policy = QwenVLPolicy.tiny(seed=0)
    images, prompts, texts = _batch()
    ids, mask = policy.target_ids(texts)
    calls = []  # the batch and length of every language-model forward
    hook = policy.model.model.language_model.register_forward_hook(
        lambda m, args, kw, out: calls.append(tuple(kw["inputs_embeds"].shape[:2])), with_kwargs=True
    )
    lp, g = _logp_and_grads(policy, images, prompts, ids, mask, packed=True)
    ref_lp, ref_g = _logp_and_grads(policy, images, prompts, ids, mask, packed=False)
    hook.remove()
    # packed: one row per distinct (image, prompt), 4 of them; unpacked: 7 rows of prompt + response
    assert calls[0][0] == 4 and calls[1][0] == 7
    assert 4 * calls[0][1] < 7 * calls[1][1]  # fewer tokens forwarded
    torch.testing.assert_close(lp, ref_lp, rtol=1e-5, atol=1e-5)
    assert g.keys() == ref_g.keys() and any("visual" in n for n in g)
    for n in g:
        torch.testing.assert_close(g[n], ref_g[n], rtol=1e-4, atol=1e-6, msg=n)


def test_shared_prompts_in_bf16_score_the_same_tokens_as_the_unpacked_rows():
    """bf16: the same function scores old and new policy (ratio exactly 1 on the first step), and
    the packed log-probs stay within bf16's rounding of the unpacked ones."""
    tiny = QwenVLPolicy.tiny(seed=0)
    policy = QwenVLPolicy(tiny.model, tiny.processor, dtype=torch.bfloat16)
    images, prompts, texts = _batch()
    ids, mask = policy.target_ids(texts)
    policy.share_prompts = True
    with torch.no_grad():
        a = policy.response_logprobs(images, prompts, ids, mask)
        b = policy.response_logprobs(images, prompts, ids, mask)
        policy.share_prompts = False
        ref = policy.response_logprobs(images, prompts, ids, mask)
    assert torch.equal(a, b)  # old and new log-probs of an unchanged policy: ratio exactly 1
    m = mask.bool()
    assert (a[m] - ref[m]).abs().max() < 0.1 and (a[m] - ref[m]).abs().mean() < 0.02
