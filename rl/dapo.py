"""DAPO (arXiv 2503.14476) for the defender: plain PyTorch, no trainer state.

For each prompt, G responses are sampled from the old policy and rewarded; every token of
response i shares the advantage A_i = (R_i - mean R) / (std R + 1e-6). The loss, minimized, is

    - (1 / sum_i |o_i|) * sum_i sum_t min(r_it A_i, clip(r_it, 1 - eps_low, 1 + eps_high) A_i)

with r_it the token's probability ratio new/old, floored at C * A_i for negative advantages
(dual-clip), normalized by the number of response tokens in the whole batch (token-level
loss). No KL term and no reference model by default. METHOD.md, "DAPO", is the specification.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from config import DapoConfig


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """(R_i - mean) / (std + eps) within consecutive groups of ``group_size``.

    The std is the unbiased sample std (torch's default), as in TRL and verl.
    """
    r = rewards.float().view(-1, group_size)
    adv = (r - r.mean(dim=1, keepdim=True)) / (r.std(dim=1, keepdim=True) + eps)
    return adv.view(-1)


def overlong_penalty(lengths: torch.Tensor, max_len: int, cache_len: int, factor: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment: 0 up to max_len - cache_len, then linear to -1 at max_len,
    -1 beyond."""
    lengths = lengths.float()
    start = max_len - cache_len
    pen = torch.where(lengths <= start, torch.zeros_like(lengths), (start - lengths) / cache_len)
    pen = torch.where(lengths > max_len, torch.full_like(lengths, -1.0), pen)
    return pen * factor


def keep_groups(scores: torch.Tensor, group_size: int, low: float, high: float) -> torch.Tensor:
    """Bool per group: its mean score (accuracy) lies strictly inside (low, high)."""
    mean = scores.float().view(-1, group_size).mean(dim=1)
    return (mean > low) & (mean < high)


@dataclass
class LossStats:
    loss: float
    clip_fraction: float  # tokens whose clipped term was the active one
    dual_clip_fraction: float
    ratio_mean: float
    ratio_max: float
    kl: float
    tokens: int


def dapo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cfg: DapoConfig,
    ref_logp: torch.Tensor | None = None,
    num_tokens: int | float | None = None,
) -> tuple[torch.Tensor, LossStats]:
    """Token-level clipped policy loss.

    logp, old_logp, ref_logp, mask: (B, T) per response token; advantages: (B,) per response.
    ``num_tokens`` is the batch's total response tokens when the batch is split in micro-batches
    (so every micro-batch is normalized by the same count); by default ``mask.sum()``.
    """
    mask = mask.to(logp.dtype)
    adv = advantages.to(logp.dtype).unsqueeze(1)
    ratio = torch.exp(logp - old_logp)
    clipped = torch.clamp(ratio, 1 - cfg.eps_low, 1 + cfg.eps_high)
    obj = torch.min(ratio * adv, clipped * adv)
    dual = torch.zeros_like(obj, dtype=torch.bool)
    if cfg.dual_clip is not None:
        floor = cfg.dual_clip * adv
        dual = (adv < 0) & (obj < floor)
        obj = torch.where(adv < 0, torch.max(obj, floor), obj)
    per_token = -obj
    kl = torch.zeros_like(per_token)
    if cfg.kl_beta and ref_logp is not None:
        d = ref_logp - logp
        kl = torch.exp(d) - d - 1  # k3 estimator (Schulman), >= 0
        per_token = per_token + cfg.kl_beta * kl
    denom = float(num_tokens) if num_tokens is not None else mask.sum().clamp(min=1.0)
    loss = (per_token * mask).sum() / denom
    with torch.no_grad():
        n = mask.sum().clamp(min=1.0)
        is_clipped = ((ratio < 1 - cfg.eps_low) & (adv < 0)) | ((ratio > 1 + cfg.eps_high) & (adv > 0))
        stats = LossStats(
            loss=float(loss.detach()),
            clip_fraction=float((is_clipped.to(mask.dtype) * mask).sum() / n),
            dual_clip_fraction=float((dual.to(mask.dtype) * mask).sum() / n),
            ratio_mean=float((ratio * mask).sum() / n),
            ratio_max=float(torch.where(mask > 0, ratio, torch.zeros_like(ratio)).max()),
            kl=float((kl * mask).sum() / n),
            tokens=int(mask.sum()),
        )
    return loss, stats


class DynamicSamplingError(RuntimeError):
    pass


def fill_batch(draw, batch_groups: int, group_size: int, cfg: DapoConfig, any_rank=lambda need: need):
    """Dynamic sampling: call ``draw()`` (-> a list of groups, each with ``.scores`` of length G)
    until ``batch_groups`` informative groups are kept, or fail after ``max_draw_factor`` draws.

    Returns (kept groups, number of groups drawn). Groups whose accuracy (``.scores``: 1 per
    right letter, whatever the format; the DAPO paper's filter) is outside (keep_low, keep_high)
    are dropped: all right or all wrong, they carry no accuracy signal. Under data
    parallelism ``any_rank`` makes the loop collective: every rank draws until every rank is full,
    so all ranks walk the data in step.
    """
    kept, drawn, draws = [], 0, 0
    while any_rank(len(kept) < batch_groups):
        if draws >= cfg.max_draw_factor:
            raise DynamicSamplingError(
                f"no full batch after filtering: {len(kept)} of {batch_groups} groups kept from {drawn} drawn "
                f"({cfg.max_draw_factor} draws); every other group was all right or all wrong. Make the data "
                "harder or easier for this policy, raise dapo.max_draw_factor, or set dapo.dynamic_sampling=false"
            )
        groups = draw()
        draws += 1
        drawn += len(groups)
        for g in groups:
            if not cfg.dynamic_sampling or bool(
                keep_groups(torch.as_tensor(g.scores), group_size, cfg.keep_low, cfg.keep_high)[0]
            ):
                kept.append(g)
    return kept[:batch_groups], drawn
