"""The language model's attention for one new token without repeating the key-value heads.

Qwen2.5-VL's language model uses grouped-query attention (the 3B: 16 query heads over 2 key-value
heads). With an attention mask — and a decoding step always has one: left pads, unwritten static
cache slots — transformers' SDPA path cannot use ``enable_gqa`` on CUDA, so it copies every key
and value head once per query head it serves (``repeat_kv``) before attending; under torch.compile
its packing of one query token (``pack_gqa``) is off. For 16 sequences of the 3B over an
896-slot cache that copy writes and re-reads ~0.23 GB per layer and token, ~8 GB per decoded
token, more than the model's weights (6.2 GB) that set the step's floor (experiments/RESULTS.md).

Here a step's single query token is packed instead: the query heads that share a key-value head
become that head's query rows, (B, heads, 1, D) -> (B, kv heads, group, D), and one SDPA call
attends them to the cache as it is, mask broadcast; the output is unpacked to the stock layout.
The same attention, computed in another shape (tests: tokens and logits equal to the stock path's
up to rounding). Prompts, scoring and training forwards (more than one query token) go through
transformers' own SDPA function unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import sdpa_attention_forward

NAME = "sdpa_packed_gqa"  # registered with transformers' attention and mask interfaces
MODES = ("stock", "packed")
DEFAULT = "packed"


def packed_gqa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' attention-function signature; (output (B, q, heads, D), None). Traced by
    torch.compile inside the compiled decoding step: nothing here waits on the GPU."""
    groups = getattr(module, "num_key_value_groups", 1)
    b, heads, q_len, dim = query.shape
    packable = (
        q_len == 1
        and groups > 1
        and kwargs.get("position_bias") is None
        and kwargs.get("softcap") is None
        and (attention_mask is None or (attention_mask.dim() == 4 and attention_mask.shape[1] == 1))
    )
    if not packable:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    # head h serves key-value head h // groups (repeat_kv's order): rows of that head's query
    q = query.reshape(b, heads // groups, groups, dim)
    out = F.scaled_dot_product_attention(q, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling)
    return out.reshape(b, heads, 1, value.shape[-1]).transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, packed_gqa_attention)
    # masks as SDPA's: prompts and training forwards build theirs through this name, and a name
    # without a mask function gets no mask at all (transformers' masking_utils)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def set_text_attention(model: torch.nn.Module, mode: str) -> bool:
    """Give ``model``'s language model the ``mode`` attention; True where it now differs from stock.
    Only an SDPA model is switched (eager and flash-attention models keep theirs)."""
    if mode not in MODES:
        raise ValueError(f"text_attention must be one of {MODES}, not {mode!r}")
    config = getattr(model.config, "text_config", model.config)
    current = str(config._attn_implementation)
    if mode == "stock":
        if current == NAME:
            config._attn_implementation = "sdpa"
        return False
    if current not in ("sdpa", NAME):
        return False
    _register()
    config._attn_implementation = NAME
    return True
