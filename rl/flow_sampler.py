"""Sampling an editor with per-step log-probs, and re-scoring a stored step (Flow-GRPO).

One code path for every editor: an editor gives ``velocity(x, t, cond)`` and ``schedule``;
everything stochastic lives here, in float32 where it is probability (rl/flow_grpo.py). With
noise level a = 0 ``sample`` is the deterministic Euler sampler of the diffusers pipelines, bit
for bit (tests/test_flow_sampler.py checks it against ``QwenImageEditPipeline.__call__``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rl.flow_grpo import first_sigma_below_one, ode_step, sde_step


@dataclass
class Trajectory:
    """One batch's rollout: every latent, and the log-prob of every SDE step (0 on ODE steps)."""

    latents: list[torch.Tensor]  # N + 1 tensors (B, L, C): x_0 = noise ... x_N = final
    log_probs: torch.Tensor  # (B, N) float32
    sde_steps: list[int]  # indices of steps sampled by the SDE: the ones trained
    sigmas: torch.Tensor  # (N + 1,)
    timesteps: torch.Tensor  # (N,)

    @property
    def final(self) -> torch.Tensor:
        return self.latents[-1]


def sde_window(steps: int, window: int, generator: torch.Generator | None = None) -> list[int]:
    """Which steps are sampled by the SDE (and trained): every step but the last, or a random
    window of ``window`` consecutive early steps (METHOD.md, "Denoising reduction")."""
    if window <= 0 or window >= steps - 1:
        return list(range(steps - 1))
    last_start = max(0, steps // 2 - window)  # high-noise half of the trajectory
    start = int(torch.randint(0, last_start + 1, (1,), generator=generator)) if last_start else 0
    return list(range(start, start + window))


@torch.no_grad()
def sample(
    editor,
    cond,
    steps: int,
    noise_level: float,
    *,
    sigma_cap: float = 0.0,
    window: int = 0,
    generator: torch.Generator | None = None,
    x: torch.Tensor | None = None,
) -> Trajectory:
    """Roll out ``cond.batch`` edits. The step noise xi is drawn on the CPU from ``generator``, so a
    seed gives the same trajectory on any device."""
    x = editor.noise(cond, generator) if x is None else x
    sigmas, timesteps = editor.schedule(steps, x.shape[1])
    cap = sigma_cap or first_sigma_below_one(sigmas)
    sde = sde_window(steps, window, generator) if noise_level > 0 else []
    latents, log_probs = [x], torch.zeros(x.shape[0], steps)
    for i in range(steps):
        v = editor.velocity(x, timesteps[i], cond)
        if i in sde:
            xi = torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.device)
            out = sde_step(x, v, sigmas[i], sigmas[i + 1], noise_level, cap, noise=xi)
            x, log_probs[:, i] = out.sample, out.log_prob.cpu()
        else:
            x = ode_step(x, v, sigmas[i], sigmas[i + 1])
        latents.append(x)
    return Trajectory(latents, log_probs, sde, sigmas, timesteps)


def step_log_prob(editor, traj: Trajectory, i: int, cond, noise_level: float, sigma_cap: float = 0.0):
    """Log-prob (with grad) of the stored step i under the current policy; also its mean and std
    (for the KL to the reference)."""
    x = traj.latents[i]
    v = editor.velocity(x, traj.timesteps[i], cond)
    cap = sigma_cap or first_sigma_below_one(traj.sigmas)
    out = sde_step(x, v, traj.sigmas[i], traj.sigmas[i + 1], noise_level, cap, sample=traj.latents[i + 1])
    return out
