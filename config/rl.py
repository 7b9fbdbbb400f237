"""The RL algorithms' typed configs: DAPO (defender) and Flow-GRPO (attacker). No torch import."""

from __future__ import annotations

from typing import Literal

from config.fields import Int, documented, settings


@settings
class DapoConfig:
    group_size: Int = documented(5, "G: responses sampled per prompt. AOT uses 5 (METHOD.md, 'AOT values').")
    eps_low: float = documented(0.2, "Lower clip of the ratio, 1 - eps_low. DAPO paper, clip-higher (0.2).")
    eps_high: float = documented(0.28, "Upper clip of the ratio, 1 + eps_high. DAPO paper, clip-higher (0.28).")
    dual_clip: float | None = documented(
        3.0,
        "C: for A < 0 the objective is floored at C * A (Ye et al. 2020, "
        "dual-clip PPO); 3 is AOT's framework default. None disables it.",
    )
    kl_beta: float = documented(
        0.0, "Weight of a k3 KL penalty to a reference policy. 0 in DAPO and AOT: no reference model is kept."
    )
    adv_eps: float = documented(1e-6, "Added to the group's reward std before dividing (METHOD.md).")
    dynamic_sampling: bool = documented(
        True,
        "Drop groups that are all right or all wrong and draw more prompts "
        "until the batch is full (DAPO paper, section 3.2). The filter reads accuracy (the share of a "
        "group's responses whose letter is right), not the mean reward, as the DAPO paper does: an "
        "all-right group with mixed formatting (rewards 1.0 and 0.8) is dropped too.",
    )
    keep_low: float = documented(
        0.01, "A group is kept only if its accuracy (share of right letters) is above this (METHOD.md)."
    )
    keep_high: float = documented(0.99, "...and below this (METHOD.md).")
    max_draw_factor: Int = documented(
        4,
        "Dynamic sampling gives up after drawing this many batches of prompts "
        "for one training batch (ours; the failure 'no sample kept after "
        "filtering' is a known DAPO pitfall).",
    )
    overlong_penalty: bool = documented(False, "Soft overlong punishment (DAPO paper, eq. 13). Off in AOT.")
    overlong_cache: Int = documented(
        512,
        "L_cache: the penalty ramps from 0 to -1 over the last L_cache tokens "
        "before max_new_tokens (DAPO paper uses 4096 of 20480).",
    )
    overlong_factor: float = documented(1.0, "Scale of the overlong penalty.")
    mask_truncated: bool = documented(
        True,
        "Leave responses cut at max_new_tokens out of the loss (DAPO paper, "
        "overlong filtering; TRL's mask_truncated_completions).",
    )
    epochs_per_batch: Int = documented(1, "Policy updates per sampled batch (one epoch: on-policy, as in AOT).")

    def validate(self) -> "DapoConfig":
        if self.group_size < 2:
            raise ValueError("dapo.group_size must be >= 2: advantages are relative within a group")
        if not (0 < self.eps_low < 1 and self.eps_high > 0):
            raise ValueError("dapo.eps_low must be in (0, 1) and eps_high > 0")
        if self.dual_clip is not None and self.dual_clip <= 1:
            raise ValueError("dapo.dual_clip must be > 1 (or null)")
        if not (0 <= self.keep_low < self.keep_high <= 1):
            raise ValueError("dapo.keep_low/keep_high must satisfy 0 <= low < high <= 1")
        return self


@settings
class FlowGrpoConfig:
    group_size: Int = documented(16, "Images per group (same prompt and source). Flow-GRPO / METHOD.md reference: 16.")
    noise_level: float = documented(0.7, "a: SDE noise scale, g_s = a sqrt(s / (1 - s)). METHOD.md: about 0.7-1.0.")
    sigma_cap: float = documented(
        0.0,
        "Cap of s in the denominator of g_s (it diverges at s = 1); 0 = the schedule's "
        "first sigma below 1 (METHOD.md; Flow-GRPO's sigma_max).",
    )
    sampling_steps: Int = documented(10, "Denoising steps of a training rollout (inference uses 40-50). METHOD.md.")
    train_window: Int = documented(
        0,
        "Train on a random window of this many consecutive early (high-noise) steps, "
        "ODE elsewhere; 0 = SDE and training on every step but the last. METHOD.md.",
    )
    clip_range: float = documented(
        1e-4, "eps of the per-step ratio clip: tiny, because the ratio is over a whole image (Flow-GRPO)."
    )
    adv_clip: float = documented(5.0, "Advantages clipped to +/- this (Flow-GRPO).")
    adv_eps: float = documented(1e-4, "Added to the group's reward std (Flow-GRPO).")
    adv_std: Literal["group", "batch"] = documented(
        "group",
        "Which reward std divides the group-centred advantages: the group's (GRPO, METHOD.md) or "
        "the whole step's ('batch': flow_grpo's shipped configs, global_std), which keeps a group "
        "whose edits differ only by sampling noise from getting unit-scale advantages.",
    )
    kl_beta: float = documented(
        0.0,
        "KL weight to the reference (the model with LoRA disabled). METHOD.md: 0 for "
        "Qwen-Image-Edit; 0.01-0.04 if images degrade (reward hacking). The KL here is the exact "
        "Gaussian one, ||mu - mu_ref||^2 / (2 g^2 |dt|); flow_grpo's code leaves out |dt|, so a beta "
        "from its configs converts as beta_here = beta_flow_grpo * |dt|, about beta / sampling_steps "
        "(6-14x smaller on a 10-step schedule).",
    )
