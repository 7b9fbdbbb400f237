"""Peer check: on identical log-probs, advantages and masks our DAPO loss equals TRL's
GRPOTrainer with loss_type="dapo", epsilon_high=0.28, beta=0 (trl is a test-only dependency)."""

from __future__ import annotations

import pytest
import torch

from rl.dapo import DapoConfig, dapo_loss

trl = pytest.importorskip("trl", reason="trl is a test-only dependency (requirements.txt)")


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    from datasets import Dataset
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from models.qwen_vl import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    model = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            tie_word_embeddings=True,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
    )
    args = trl.GRPOConfig(
        output_dir=str(tmp_path_factory.mktemp("trl")),
        loss_type="dapo",
        epsilon=0.2,
        epsilon_high=0.28,
        beta=0.0,
        num_generations=4,
        per_device_train_batch_size=4,
        max_completion_length=4,
        use_cpu=True,
        bf16=False,
        report_to=[],
        save_strategy="no",
        max_steps=1,
    )
    t = trl.GRPOTrainer(
        model=model,
        reward_funcs=lambda completions, **kw: [0.0] * len(completions),
        args=args,
        train_dataset=Dataset.from_list([{"prompt": "red circle"}] * 8),
        processing_class=tok,
    )
    t.model.train()
    t.current_gradient_accumulation_steps = 1
    return t


def _case(seed: int):
    g = torch.Generator().manual_seed(seed)
    B, T = 6, 5
    old = -torch.rand(B, T, generator=g) * 3
    logp = (old + (torch.rand(B, T, generator=g) - 0.5) * 0.8).requires_grad_(True)  # ratios in ~[0.67, 1.5]
    adv = torch.randn(B, generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.25).float()
    mask[:, 0] = 1
    return logp, old, adv, mask


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_loss_and_gradient_equal_trl(trainer, seed):
    logp, old, adv, mask = _case(seed)
    B, T = mask.shape
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: (logp, torch.zeros_like(logp), None)
    inputs = {
        "prompt_ids": torch.zeros(B, 2, dtype=torch.long),
        "prompt_mask": torch.ones(B, 2, dtype=torch.long),
        "completion_ids": torch.zeros(B, T, dtype=torch.long),
        "completion_mask": mask.long(),
        "advantages": adv,
        "old_per_token_logps": old,
        "num_items_in_batch": mask.sum(),
    }
    theirs = trainer._compute_loss(trainer.model, inputs)
    (g_theirs,) = torch.autograd.grad(theirs, logp)
    # TRL has no dual-clip: compare with it off, and with it on where it cannot bind (ratios <= 1.5 < C = 3).
    for cfg in (DapoConfig(dual_clip=None), DapoConfig()):
        ours, _ = dapo_loss(logp, old, adv, mask, cfg)
        (g_ours,) = torch.autograd.grad(ours, logp)
        assert ours.item() == pytest.approx(theirs.item(), rel=1e-6, abs=1e-7)
        assert torch.allclose(g_ours, g_theirs, atol=1e-7)
