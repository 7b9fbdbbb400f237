"""A group's completions scored after one copy of their prompt, in one row.

DAPO scores G completions of each prompt (8 by default), and a scoring batch holds each prompt G
times: at the 3B benchmark's sizes (577 prompt and 256 completion tokens) 69% of the tokens an
update forwards and backwards are repeated prompts. Here the rows that share a prompt become one
packed row — the prompt's real tokens once, then each completion — with an attention mask under
which every completion sees the whole prompt and its own earlier tokens, and nothing of the other
completions; each token keeps the mRoPE position it has in its own row. The log-probabilities are
those of the unpacked rows (tests/test_shared_prompts.py: equal in float32, log-probs and
gradients), and the prompt's forward and backward run once per group instead of G times.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.shared_images import distinct_rows


@dataclass
class PackedGroups:
    ids: torch.Tensor  # (D, L) one row per distinct prompt: its real tokens, then each completion
    kinds: torch.Tensor  # (D, L) mm_token_type_ids of those tokens
    position: torch.Tensor  # (3, D, L) each token's mRoPE position in its own unpacked row
    allowed: torch.Tensor  # (D, L, L) bool: query i may attend to key j
    keep: torch.Tensor  # (K,) the packed positions whose logits any row needs (logits_to_keep)
    prompt_rows: list[int]  # the original row each packed row's prompt (and image) comes from
    row_of: torch.Tensor  # (B,) the packed row of each original row
    take: torch.Tensor  # (B, T) where, among ``keep``, the logits predicting each response token are


def pack_groups(
    ids: torch.Tensor,
    attention: torch.Tensor,
    kinds: torch.Tensor,
    position: torch.Tensor,
    response_len: int,
    groups: list[int],
    pad_id: int,
) -> PackedGroups:
    """Pack the unpacked batch (``ids``, ``attention``, ``kinds``: (B, P + T), left-padded prompts
    of P then T response tokens; ``position``: (3, B, P + T)) by ``groups`` (each row's group, the
    rows of a group sharing one prompt). A completion's padding after its end stays in place and,
    as in its own row, no query sees it; a packed row shorter than the longest is padded with
    ``pad_id``, that padding attending to itself only (a query with no key would give NaN)."""
    B, full = ids.shape
    P, T = full - response_len, response_len
    first, inverse = distinct_rows(groups)
    members = [[r for r in range(B) if inverse[r] == d] for d in range(len(first))]
    prompts = [attention[first[d], :P].nonzero().flatten() for d in range(len(first))]
    lengths = [len(p) + len(m) * T for p, m in zip(prompts, members)]
    L, D = max(lengths), len(first)
    out_ids = ids.new_full((D, L), pad_id)
    out_kinds = kinds.new_zeros((D, L))
    out_pos = position.new_zeros((3, D, L))
    allowed = torch.zeros(D, L, L, dtype=torch.bool)
    needed: list[list[int]] = [[] for _ in range(B)]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for d, (p, rows) in enumerate(zip(prompts, members)):
        n = len(p)
        src = [(first[d], p)] + [(r, torch.arange(P, full)) for r in rows]
        at = 0
        for r, cols in src:
            out_ids[d, at : at + len(cols)] = ids[r, cols]
            out_kinds[d, at : at + len(cols)] = kinds[r, cols]
            out_pos[:, d, at : at + len(cols)] = position[:, r, cols]
            at += len(cols)
        allowed[d, :n, :n] = torch.ones(n, n, dtype=torch.bool).tril()
        for s, r in enumerate(rows):
            o = n + s * T
            allowed[d, o : o + T, :n] = True
            allowed[d, o : o + T, o : o + T] = causal & attention[r, P:].bool()[None, :]  # as its own row's mask
            # response token j is predicted at the token before it: the prompt's last, then its own
            needed[r] = [n - 1] + list(range(o, o + T - 1))
        pad = torch.arange(lengths[d], L)
        allowed[d, pad, pad] = True
    columns = sorted({i for r in range(B) for i in needed[r]})
    index = {i: k for k, i in enumerate(columns)}
    take = torch.tensor([[index[i] for i in needed[r]] for r in range(B)])
    return PackedGroups(out_ids, out_kinds, out_pos, allowed, torch.tensor(columns), first, torch.tensor(inverse), take)


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(D, L, L) bool -> (D, 1, L, L) additive mask in ``dtype`` (0 where allowed, the dtype's
    lowest value elsewhere): what eager and SDPA attention both take as a prepared 4D mask."""
    mask = torch.zeros(allowed.shape, dtype=dtype)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]
