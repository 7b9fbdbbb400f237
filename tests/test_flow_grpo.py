"""Flow-GRPO core and the attacker reward against independent computations (METHOD.md)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from config import FlowGrpoConfig
from rl.flow_grpo import flow_grpo_loss, gaussian_kl, group_advantages, noise_scale, ode_step, sde_step
from training.attacker_rewards import AttackSample, attacker_reward, combine, consecutive_failures, efficacy, integrity


def _xv(seed=0, shape=(3, 4, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def test_sde_log_prob_equals_an_independent_gaussian_density():
    x, v = _xv()
    s, sn, a = 0.6, 0.5, 0.8
    out = sde_step(x, v, s, sn, a, generator=torch.Generator().manual_seed(1))
    # Independent float64 computation of the mean and std from METHOD.md's formulas.
    xd, vd = x.double(), v.double()
    g = a * math.sqrt(s / (1 - s))
    dt = sn - s
    mean = xd + (vd + g**2 / (2 * s) * (xd + (1 - s) * vd)) * dt
    std = g * math.sqrt(-dt)
    dens = torch.distributions.Normal(mean, std).log_prob(out.sample.double()).mean(dim=(1, 2, 3))
    assert torch.allclose(out.mean.double(), mean, atol=1e-5)
    assert torch.allclose(out.log_prob.double(), dens, atol=1e-5)
    assert out.log_prob.dtype == torch.float32 and out.log_prob.shape == (3,)


def test_noise_scale_caps_sigma_at_one():
    # at s = 1 only the denominator takes the cap (the first sigma below 1), as Flow-GRPO does
    assert float(noise_scale(torch.tensor(1.0), 0.7, 0.9)) == pytest.approx(0.7 * math.sqrt(1 / 0.1), rel=1e-5)
    assert float(noise_scale(torch.tensor(0.5), 0.7, 0.999)) == pytest.approx(0.7)


def test_a_zero_reproduces_the_ode_sampler_bit_for_bit():
    x, _ = _xv(2)
    sigmas = torch.linspace(1.0, 0.0, 11)
    model = lambda z, s: torch.tanh(z) * (1 + s)  # noqa: E731 - any deterministic velocity field
    a_ode, a_sde = x.clone(), x.clone()
    for s, sn in zip(sigmas[:-1], sigmas[1:]):
        a_ode = ode_step(a_ode, model(a_ode, s), s, sn)
        a_sde = sde_step(a_sde, model(a_sde, s), s, sn, a=0.0).sample
    assert torch.equal(a_ode, a_sde)


def test_first_update_is_on_policy_ratio_one_kl_zero():
    x, v = _xv(3)
    roll = sde_step(x, v, 0.7, 0.6, 0.7, generator=torch.Generator().manual_seed(0))
    again = sde_step(x, v, 0.7, 0.6, 0.7, sample=roll.sample)  # same model, same inputs: training-time recompute
    assert torch.equal(again.log_prob, roll.log_prob)
    kl = gaussian_kl(again.mean, roll.mean, again.std.expand_as(again.mean))
    assert torch.equal(kl, torch.zeros(3))
    loss, st = flow_grpo_loss(
        again.log_prob, roll.log_prob, torch.tensor([1.0, -0.5, 2.0]), FlowGrpoConfig(kl_beta=0.04), kl
    )
    assert st["ratio_max"] == 1.0 and st["clip_fraction"] == 0.0 and st["kl"] == 0.0
    assert loss.item() == pytest.approx(-(1.0 - 0.5 + 2.0) / 3)


def test_per_step_clip_and_kl_hand_values():
    cfg = FlowGrpoConfig(clip_range=1e-4, kl_beta=0.5)
    old = torch.zeros(2)
    new = torch.log(torch.tensor([1.001, 0.999])).requires_grad_(True)  # both outside the 1e-4 band
    adv = torch.tensor([1.0, 1.0])
    loss, st = flow_grpo_loss(new, old, adv, cfg, kl=torch.tensor([0.2, 0.4]))
    # min(1.001, 1.0001) = 1.0001 for the first; min(0.999, 0.9999) = 0.999 for the second.
    assert loss.item() == pytest.approx(-(1.0001 + 0.999) / 2 + 0.5 * 0.3, rel=1e-6)
    assert st["clip_fraction"] == 1.0
    (g,) = torch.autograd.grad(loss, new)
    assert g[0].item() == 0.0 and g[1].item() == pytest.approx(-0.999 / 2, rel=1e-5)  # only the unclipped term moves


def test_group_advantages_normalize_and_clip():
    r = torch.tensor([1.0, 0, 0, 0, 2.0, 2.0, 2.0, 2.0])
    adv = group_advantages(r, 4)
    std = math.sqrt((0.75**2 + 3 * 0.25**2) / 3)
    assert adv[:4].tolist() == pytest.approx([0.75 / (std + 1e-4)] + [-0.25 / (std + 1e-4)] * 3, rel=1e-6)
    assert adv[4:].tolist() == [0.0] * 4
    one_hit = torch.zeros(40)
    one_hit[0] = 1.0  # unclipped it would be 0.975 / 0.156 = 6.2
    assert group_advantages(one_hit, 40)[0].item() == 5.0
    # flow_grpo's global std: one scale for the batch, so the noise-only group [1, 1.01, ...] keeps
    # advantages as small as its spread while the group's own std would blow it up to unit scale.
    r = torch.tensor([0.0, 1.0, 0.0, 1.0, 1.0, 1.01, 1.0, 1.01])
    batch = group_advantages(r, 4, std="batch")
    assert batch.tolist() == pytest.approx(
        [(v - m) / (float(r.std()) + 1e-4) for v, m in zip(r.tolist(), [0.5] * 4 + [1.005] * 4)], rel=1e-5
    )
    assert float(batch[4:].abs().max()) < 0.02 < 0.8 < float(group_advantages(r, 4)[4:].abs().min())
    with pytest.raises(ValueError, match="std"):
        group_advantages(r, 4, std="global")


def test_group_advantages_skip_unscored_rewards():
    """NaN = not scored (invalid_score 'skip'): advantage 0, and the group's mean/std (or the
    batch's) come from the scored rewards only, by hand."""
    nan = float("nan")
    r = torch.tensor([0.3, nan, 0.1, 0.2, nan, nan, nan, 0.4, nan, nan, nan, nan])
    adv = group_advantages(r, 4)
    sd = math.sqrt((0.1**2 + 0.1**2) / 2)  # unbiased over 0.3, 0.1, 0.2 (mean 0.2)
    assert adv[:4].tolist() == pytest.approx([0.1 / (sd + 1e-4), 0.0, -0.1 / (sd + 1e-4), 0.0], rel=1e-5)
    assert adv[4:].tolist() == [0.0] * 8  # one scored edit, or none: nothing to rank
    assert not adv.isnan().any()
    batch = group_advantages(r, 4, std="batch")
    bsd = float(torch.tensor([0.3, 0.1, 0.2, 0.4]).std())
    assert batch[:4].tolist() == pytest.approx([0.1 / (bsd + 1e-4), 0.0, -0.1 / (bsd + 1e-4), 0.0], rel=1e-5)
    # With every reward scored the masked path is the plain one.
    full = torch.tensor([0.3, 0.7, 0.1, 0.2, 1.0, 0.0, 0.5, 0.4])
    g = full.view(2, 4)
    plain = ((g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + 1e-4)).view(-1)
    assert group_advantages(full, 4).tolist() == pytest.approx(plain.tolist(), rel=1e-6)


# ------------------------------------------------------------------ rewards
def _images():
    rng = np.random.default_rng(0)
    clean = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    edited = clean.copy()
    edited[40:60, 40:60] = 255  # a distractor painted away from the target
    broken = clean.copy()
    broken[5:25, 5:25] = 0  # the target itself repainted
    return Image.fromarray(clean), Image.fromarray(edited), Image.fromarray(broken)


def test_integrity_gate_on_hand_built_images():
    clean, edited, broken = _images()
    s = AttackSample([[5, 5, 25, 25]], [False, False, True])
    ok = integrity(clean, edited, s)
    assert ok["integrity"] == 1.0 and ok["target_ssim_min"] == 1.0
    bad = integrity(clean, broken, s)
    assert bad["integrity"] == 0.0 and bad["target_ssim_min"] < 0.1
    floor = integrity(clean, edited, s, global_floor=0.99)
    assert floor["integrity"] == 0.0 and floor["global_ssim"] < 0.99  # repainted too much of the image


@pytest.mark.parametrize(
    "answers,c,e",
    [
        ([False, False, True], 2, 2 / 3),
        ([True, False, False], 0, 0.0),
        ([False, False, False], 3, 1.0),
        ([False, True, False], 1, 1 / 3),
    ],
)
def test_efficacy_counts_consecutive_failures(answers, c, e):
    assert consecutive_failures(answers) == c
    assert efficacy(AttackSample([], answers))["efficacy"] == pytest.approx(e)


def test_reward_is_integrity_times_efficacy_and_components_are_kept():
    clean, edited, broken = _images()
    s = AttackSample([[5, 5, 25, 25]], [False, False, True])
    r = attacker_reward(clean, edited, s)
    assert r["reward"] == pytest.approx(2 / 3) and r["integrity"] == 1.0 and r["consecutive_failures"] == 2
    r = attacker_reward(clean, broken, s, invalid_penalty=-0.5)
    assert r["reward"] == -0.5 and r["efficacy"] == pytest.approx(2 / 3)  # efficacy still recorded

    def aot(cleans, editeds, items):
        return [attacker_reward(c, e, s) for c, e in zip(cleans, editeds)]

    def const(cleans, editeds, items):
        return [{"reward": 1.0} for _ in items]

    both = combine(
        {"aot": aot, "const": const}, {"aot": 2.0, "const": 0.5}, [clean, clean], [edited, broken], [None, None]
    )
    assert both[0]["reward"] == pytest.approx(2 * 2 / 3 + 0.5) and both[0]["aot/integrity"] == 1.0
    assert both[1]["reward"] == pytest.approx(0.5) and both[1]["aot/integrity"] == 0.0


def test_a_bf16_rollout_scores_the_sample_it_stores():
    """In bf16 the stored sample is the float32 draw rounded; its log-prob must be taken on that
    stored sample, or re-scoring it in training gives a first ratio != 1 and pushes low-noise
    steps outside a 1e-4 clip band (their negative-advantage samples then get no gradient)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 64, 16, generator=g).to(torch.bfloat16)
    v = torch.randn(8, 64, 16, generator=g).to(torch.bfloat16)
    sigmas = torch.linspace(1.0, 0.0, 11)
    for i in range(9):
        out = sde_step(x, v, sigmas[i], sigmas[i + 1], 1.0, s_cap=0.95, generator=g)
        assert out.sample.dtype == torch.bfloat16
        again = sde_step(x, v, sigmas[i], sigmas[i + 1], 1.0, s_cap=0.95, sample=out.sample)
        assert torch.equal(torch.exp(again.log_prob - out.log_prob), torch.ones(8)), i
        x = out.sample


def test_kl_is_the_exact_gaussian_kl_and_flow_grpo_betas_convert_by_dt():
    """Two policies' step Gaussians share std g sqrt(|dt|): KL = ||mu - mu_ref||^2 / (2 g^2 |dt|),
    elementwise mean. flow_grpo's code divides by 2 g^2 only, i.e. its KL is ours times |dt|: the
    conversion the config's kl_beta help gives (beta_here = beta_flow_grpo * |dt|)."""
    g = torch.Generator().manual_seed(1)
    x, v, dv = (torch.randn(2, 8, 4, generator=g) for _ in range(3))
    s, s_next, a = 0.6, 0.5, 0.8
    pol, ref = sde_step(x, v + 0.1 * dv, s, s_next, a), sde_step(x, v, s, s_next, a)
    kl = gaussian_kl(pol.mean, ref.mean, pol.std.expand_as(pol.mean))
    g_s2 = a**2 * s / (1 - s)  # g_s^2 by hand
    dt = s_next - s
    mu_diff = (0.1 * dv) * (1 + g_s2 / (2 * s) * (1 - s)) * dt  # d(mu)/dv times the velocity change
    by_hand = (mu_diff**2).mean(dim=(1, 2)) / (2 * g_s2 * abs(dt))
    assert torch.allclose(kl, by_hand, rtol=1e-5)
    flow_grpo_form = ((pol.mean - ref.mean) ** 2).mean(dim=(1, 2)) / (2 * g_s2)
    assert torch.allclose(kl * abs(dt), flow_grpo_form, rtol=1e-5)
