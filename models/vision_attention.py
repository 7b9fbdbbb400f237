"""Qwen2.5-VL's windowed vision attention as a few batched calls instead of one call per window.

Without flash-attention, transformers' ``Qwen2_5_VLVisionAttention`` runs one SDPA call per
window (``cu_seqlens``): a 448x448 image has 16 windows of 64 patches, so a batch of 64 images
makes 1024 small calls in each of the 28 windowed layers, forward, recompute and backward — each
a few microseconds of math behind tens of microseconds of launch overhead on a GPU. Here windows
of equal length become the batch dimension of one SDPA call (one call per distinct length: a
handful, edge windows of odd-sized grids included), the attention each window sees is unchanged
(tests: outputs and gradients equal to the stock loop's). The default: on an H100 it took the
3B architecture's DAPO update from 1.30 to 1.04 s at batch 16 and from 4.96 to 3.50 s at batch 64
(experiments/RESULTS.md); ``defender.model.vision_attention: stock`` restores transformers' loop.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

MODES = ("stock", "grouped")
DEFAULT = "grouped"


def grouped_window_attention(
    self,
    hidden_states: torch.Tensor,
    cu_seqlens: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    max_seqlen: int | None = None,
    **kwargs,
) -> torch.Tensor:
    """Drop-in forward of ``Qwen2_5_VLVisionAttention`` (same projections, rotary and scaling)."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

    n = hidden_states.shape[0]
    q, k, v = self.qkv(hidden_states).reshape(n, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = position_embeddings
    q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)  # (n, heads, head_dim) each
    bounds = cu_seqlens.tolist()
    starts, lengths = bounds[:-1], [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    if (
        len(set(lengths)) == 1 and lengths[0] and bounds[0] == 0 and bounds[-1] == n
    ):  # every window the same length (grids a multiple of the window): views only
        w, length = len(lengths), lengths[0]
        out = _attend(*(t.reshape(w, length, *t.shape[1:]) for t in (q, k, v)), self.scaling).reshape_as(q)
    else:
        out = q.new_empty(q.shape)
        by_length: dict[int, list[int]] = {}
        for s, length in zip(starts, lengths):
            if length:
                by_length.setdefault(length, []).append(s)
        for length, group in by_length.items():
            idx = (torch.tensor(group)[:, None] + torch.arange(length)[None]).to(q.device)  # (windows, length)
            out[idx] = _attend(q[idx], k[idx], v[idx], self.scaling)
    return self.proj(out.reshape(n, -1))


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """(windows, length, heads, dim) -> the same shape; full attention inside each window."""
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return o.transpose(1, 2)


def set_vision_attention(model: torch.nn.Module, mode: str) -> int:
    """Give every Qwen2.5-VL vision attention of ``model`` the ``mode`` forward; returns how many.
    Flash-attention models keep theirs (their varlen kernel already takes all windows at once)."""
    if mode not in MODES:
        raise ValueError(f"vision_attention must be one of {MODES}, not {mode!r}")
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLVisionAttention

    n = 0
    for m in model.modules():
        if not isinstance(m, Qwen2_5_VLVisionAttention):
            continue
        if mode == "stock":
            m.__dict__.pop("forward", None)  # back to the class's own forward
        elif "flash" not in str(m.config._attn_implementation):
            m.forward = types.MethodType(grouped_window_attention, m)
        else:
            continue
        n += 1
    return n
