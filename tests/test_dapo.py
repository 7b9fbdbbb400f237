"""DAPO core against hand computations (METHOD.md, "DAPO")."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from rl.dapo import (
    DapoConfig,
    DynamicSamplingError,
    dapo_loss,
    fill_batch,
    group_advantages,
    keep_groups,
    overlong_penalty,
)


def test_group_advantages_hand_values():
    adv = group_advantages(torch.tensor([1.0, 0, 0, 1, 1, 0.8, 0.8, 0.8, 0.8, 0.8]), group_size=5)
    std = math.sqrt(0.3)  # unbiased: ((3 * 0.4^2) + (2 * 0.6^2)) / 4
    expected = [0.4 / std, -0.6 / std, -0.6 / std, 0.4 / std, 0.4 / std, 0, 0, 0, 0, 0]
    assert adv.tolist() == pytest.approx(expected, abs=1e-5)


def _example():
    # Two responses of 3 tokens. Ratios chosen by hand: response 0 has A = +1, response 1 A = -1.
    old = torch.zeros(2, 3)
    ratios = torch.tensor([[1.0, 1.5, 0.5], [1.0, 5.0, 0.7]])
    logp = torch.log(ratios).requires_grad_(True)
    adv = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[1.0, 1, 1], [1, 1, 0]])
    return logp, old, adv, mask


def test_clipped_dual_clipped_token_level_loss():
    logp, old, adv, mask = _example()
    # A=+1: min(1, 1) + min(1.5, 1.28) + min(0.5, 0.8) = 1 + 1.28 + 0.5
    # A=-1: min(-1, -1) + max(min(-5, -1.28), -3) = -1 - 3; the third token is masked.
    loss, st = dapo_loss(logp, old, adv, mask, DapoConfig())
    assert loss.item() == pytest.approx(-(1 + 1.28 + 0.5 - 1 - 3) / 5)
    assert st.tokens == 5 and st.clip_fraction == pytest.approx(1 / 5) and st.dual_clip_fraction == pytest.approx(1 / 5)
    # Without dual-clip the -5 stands.
    loss, st = dapo_loss(logp, old, adv, mask, DapoConfig(dual_clip=None))
    assert loss.item() == pytest.approx(-(1 + 1.28 + 0.5 - 1 - 5) / 5)
    assert st.dual_clip_fraction == 0.0
    # Normalizing by a batch-wide token count (micro-batching) divides by that instead.
    loss, _ = dapo_loss(logp, old, adv, mask, DapoConfig(), num_tokens=10)
    assert loss.item() == pytest.approx(-(1 + 1.28 + 0.5 - 1 - 3) / 10)


def test_gradients_flow_only_through_unclipped_tokens():
    logp, old, adv, mask = _example()
    loss, _ = dapo_loss(logp, old, adv, mask, DapoConfig())
    loss.backward()
    # d(-r A / N)/d logp = -r A / N where the unclipped term is active, 0 where clipped or masked.
    expected = torch.tensor([[-1.0 / 5, 0.0, -0.5 / 5], [1.0 / 5, 0.0, 0.0]])
    assert torch.allclose(logp.grad, expected, atol=1e-6)


def test_on_policy_gradient_is_plain_policy_gradient():
    torch.manual_seed(0)
    logp = torch.randn(4, 6).requires_grad_(True)
    old = logp.detach().clone()
    adv = torch.tensor([1.5, -0.5, 0.25, -1.25])
    mask = (torch.rand(4, 6) > 0.3).float()
    loss, st = dapo_loss(logp, old, adv, mask, DapoConfig())
    assert st.ratio_mean == pytest.approx(1.0) and st.ratio_max == pytest.approx(1.0) and st.clip_fraction == 0.0
    loss.backward()
    pg = -(adv.unsqueeze(1) * mask) / mask.sum()  # gradient of -(1/N) sum A_i log pi
    assert torch.allclose(logp.grad, pg, atol=1e-7)


def test_kl_penalty_k3_hand_value():
    logp = torch.zeros(1, 2)
    ref = torch.tensor([[math.log(2.0), 0.0]])
    loss, st = dapo_loss(logp, logp, torch.zeros(1), torch.ones(1, 2), DapoConfig(kl_beta=0.5), ref_logp=ref)
    k3 = 2 - math.log(2) - 1
    assert st.kl == pytest.approx(k3 / 2)
    assert loss.item() == pytest.approx(0.5 * k3 / 2)


def test_overlong_penalty_values():
    pen = overlong_penalty(torch.tensor([5, 6, 8, 10, 12]), max_len=10, cache_len=4)
    assert pen.tolist() == pytest.approx([0.0, 0.0, -0.5, -1.0, -1.0])
    assert overlong_penalty(torch.tensor([9]), 10, 4, factor=0.5).tolist() == pytest.approx([-0.375])


def test_keep_groups():
    scores = torch.tensor([1, 1, 1, 0, 1, 0, 1, 0, 0, 0, 0, 0], dtype=torch.float)
    assert keep_groups(scores, 3, 0.01, 0.99).tolist() == [False, True, True, False]


def test_dynamic_sampling_refills_and_fails_clearly():
    def group(*scores):
        return SimpleNamespace(scores=list(scores))

    batches = iter([[group(1, 1), group(0, 1), group(0, 0)], [group(1, 0), group(1, 1), group(0, 1)]])
    kept, drawn = fill_batch(lambda: next(batches), batch_groups=3, group_size=2, cfg=DapoConfig())
    assert [g.scores for g in kept] == [[0, 1], [1, 0], [0, 1]] and drawn == 6
    always_solved = lambda: [group(1, 1), group(1, 1)]  # noqa: E731
    with pytest.raises(DynamicSamplingError, match="all right or all wrong"):
        fill_batch(always_solved, batch_groups=1, group_size=2, cfg=DapoConfig(max_draw_factor=3))
    kept, _ = fill_batch(always_solved, batch_groups=2, group_size=2, cfg=DapoConfig(dynamic_sampling=False))
    assert len(kept) == 2


def test_config_validation():
    with pytest.raises(ValueError, match="group_size"):
        DapoConfig(group_size=1).validate()
    with pytest.raises(ValueError, match="dual_clip"):
        DapoConfig(dual_clip=0.5).validate()
