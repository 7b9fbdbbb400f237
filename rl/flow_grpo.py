"""Flow-GRPO (arXiv 2505.05470) for the attacker: plain PyTorch, one code path for every model.

Flow matching: x_s = (1 - s) x0 + s eps, s in (0, 1], s = 1 is noise; the model predicts
v ~ eps - x0; a denoising step goes s -> s' < s with dt = s' - s < 0. The ODE step is
x' = x + v dt. Its SDE counterpart with the same marginals (METHOD.md, "Flow-GRPO"):

    g_s = a * sqrt(s / (1 - s))        (at s = 1 the denominator uses the schedule's first sigma
                                        below 1, as Flow-GRPO does; a fixed cap like 0.999 makes the
                                        first step's drift ~40x too large and the rollout explodes)
    mu  = x + [v + g_s^2 / (2 s) * (x + (1 - s) v)] dt
    x'  = mu + g_s * sqrt(-dt) * xi,   xi ~ N(0, I)

so the policy of one step is N(mu, g_s^2 (-dt) I). Its log-density is averaged over latent
elements and computed in float32. With a = 0 the step is exactly the ODE step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from config import FlowGrpoConfig


@dataclass
class StepOut:
    sample: torch.Tensor  # x'
    mean: torch.Tensor  # mu
    std: torch.Tensor  # g_s sqrt(-dt), shape broadcastable to the sample (one value per batch item)
    log_prob: torch.Tensor  # (B,) mean over latent elements, float32 (zeros when std == 0)


def noise_scale(s: torch.Tensor, a: float, s_cap: float) -> torch.Tensor:
    """g_s = a sqrt(s / (1 - min(s, s_cap))): at s = 1 the formula diverges, so the denominator
    takes ``s_cap``, the schedule's first sigma below 1 (``first_sigma_below_one``)."""
    return a * torch.sqrt(s / (1 - torch.clamp(s, max=s_cap)))


def first_sigma_below_one(sigmas: torch.Tensor) -> float:
    below = sigmas[sigmas < 1]
    return float(below.max()) if below.numel() else 0.999


def _bcast(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(t, dtype=torch.float32, device=like.device)
    if t.dim() == 0:
        t = t.expand(like.shape[0])
    return t.view(-1, *([1] * (like.dim() - 1)))


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, std^2 I), averaged over all but the batch dimension, in float32."""
    x, mean, std = x.float(), mean.float(), std.float()
    lp = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return lp.mean(dim=tuple(range(1, x.dim())))


def sde_step(
    x: torch.Tensor,
    v: torch.Tensor,
    s,
    s_next,
    a: float,
    s_cap: float = 0.999,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    sample: torch.Tensor | None = None,
) -> StepOut:
    """One SDE denoising step (or, with ``sample`` given, the log-prob of that step's sample).

    ``s``, ``s_next``: scalars or per-item tensors (B,). ``noise``: the xi to use (for
    reproducibility); ``sample``: an existing x' whose log-prob is wanted (training).
    """
    xf, vf = x.float(), v.float()
    s_t, sn_t = _bcast(s, xf), _bcast(s_next, xf)
    dt = sn_t - s_t
    g = noise_scale(s_t, a, s_cap)
    mean = xf + (vf + g**2 / (2 * s_t) * (xf + (1 - s_t) * vf)) * dt
    std = g * torch.sqrt(-dt)
    if sample is None:
        if a == 0:
            sample = mean
        else:
            xi = noise if noise is not None else torch.randn(xf.shape, generator=generator, device=xf.device)
            sample = mean + std * xi.float()
        # What the rollout keeps is the sample in the model's dtype: its log-prob is taken on exactly
        # that tensor, the one training re-scores, so the first ratio is 1 in bf16 too (scoring the
        # float32 draw instead put most low-noise steps outside a 1e-4 clip band).
        sample = sample.to(x.dtype)
    if a == 0:
        log_prob = torch.zeros(x.shape[0], device=x.device)
    else:
        log_prob = gaussian_log_prob(sample, mean, std.expand_as(mean))
    return StepOut(sample.to(x.dtype), mean, std, log_prob)


def ode_step(x: torch.Tensor, v: torch.Tensor, s, s_next) -> torch.Tensor:
    """The deterministic Euler step x + v dt (the sampler every flow-matching pipeline runs)."""
    dt = _bcast(s_next, x.float()) - _bcast(s, x.float())
    return (x.float() + v.float() * dt).to(x.dtype)


def group_advantages(
    rewards: torch.Tensor, group_size: int, eps: float = 1e-4, clip: float = 5.0, std: str = "group"
) -> torch.Tensor:
    """Advantages centred per group, divided by the group's reward std (``std="group"``) or by
    the whole batch's (``"batch"``, flow_grpo's ``global_std``), clipped to +/- clip (Flow-GRPO:
    std + 1e-4, clip 5). With the group's std a group whose edits differ only by noise gets
    unit-scale advantages like one whose edits differ in what they do; the batch's keeps such a
    group's advantages as small as its spread.

    A NaN reward means "not scored" (a broken edit under ``invalid_score: skip``): it gets advantage
    0, and the mean and std are those of the group's (batch's) scored rewards only."""
    if std not in ("group", "batch"):
        raise ValueError(f"std must be 'group' or 'batch', not {std!r}")
    r = rewards.float().view(-1, group_size)
    scored = ~torch.isnan(r)
    n = scored.sum(1, keepdim=True)
    r0 = torch.where(scored, r, torch.zeros_like(r))
    mean = r0.sum(1, keepdim=True) / n.clamp(min=1)
    dev = torch.where(scored, r - mean, torch.zeros_like(r))
    if std == "group":  # unbiased, as torch.std
        scale = (dev.pow(2).sum(1, keepdim=True) / (n - 1).clamp(min=1)).sqrt()
    else:
        flat = r[scored]
        scale = flat.std() if flat.numel() > 1 else torch.zeros(())
    adv = dev / (scale + eps)
    return adv.clamp(-clip, clip).view(-1)


def gaussian_kl(mean: torch.Tensor, ref_mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, std^2) || N(ref_mean, std^2)) per element = ||mean - ref||^2 / (2 std^2), averaged
    over latent elements: (B,)."""
    d = (mean.float() - ref_mean.float()) ** 2 / (2 * std.float() ** 2)
    return d.mean(dim=tuple(range(1, d.dim())))


def flow_grpo_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    cfg: FlowGrpoConfig,
    kl: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict]:
    """Loss (to minimize) of one trained denoising step for a batch of trajectories.

    -mean_b min(r_b A_b, clip(r_b, 1 - eps, 1 + eps) A_b) + beta * mean_b KL_b, with the
    per-step ratio r_b = exp(log_prob - old_log_prob). Summed over trained steps by the caller
    (each step's loss is divided by the number of trained steps there).
    """
    ratio = torch.exp(log_prob.float() - old_log_prob.float())
    adv = advantages.float()
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - cfg.clip_range, 1 + cfg.clip_range) * adv
    policy = -torch.min(unclipped, clipped).mean()
    loss = policy
    kl_mean = torch.zeros((), device=log_prob.device)
    if cfg.kl_beta and kl is not None:
        kl_mean = kl.float().mean()
        loss = loss + cfg.kl_beta * kl_mean
    with torch.no_grad():
        stats = {
            "policy_loss": float(policy),
            "kl": float(kl_mean),
            "ratio_mean": float(ratio.mean()),
            "ratio_max": float(ratio.max()),
            "clip_fraction": float(((ratio - 1).abs() > cfg.clip_range).float().mean()),
        }
    return loss, stats
