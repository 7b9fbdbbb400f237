"""Defender training: supervised warm-up and DAPO, with exact resume.

The DAPO step reads as the algorithm does: sample G responses per prompt -> reward -> group
advantages (dynamic sampling drops uninformative groups and draws more) -> clipped token-level
update. With one update per batch (AOT's on-policy setting) the old log-probs are the new ones
detached; with several, they come from the same function and micro-batches as the update. Either
way the first ratio of a batch is exactly 1. Checkpoints hold model, optimizer, step, RNG and
data position.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from config import DefenderTrainConfig
from evaluation.answers import answer_items
from models.compiled_layers import compiled_layers
from models.mcq import extract_choice, mcq_reward
from rl.dapo import dapo_loss, fill_batch, group_advantages, overlong_penalty
from training import distributed as dist
from training.checkpoint import load_trainer_state, save_checkpoint


@dataclass
class Example:
    id: str
    image: Image.Image
    prompt: str
    answer: str
    num_options: int


class DataStream:
    """Deterministic epochs over examples; the position (epoch, index) goes into checkpoints."""

    def __init__(self, n: int, seed: int, epoch: int = 0, index: int = 0):
        self.n, self.seed, self.epoch, self.index = n, seed, epoch, index
        self._order = self._perm()

    def _perm(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if self.index >= self.n:
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._perm()
            out.append(self._order[self.index])
            self.index += 1
        return out

    def position(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}


@dataclass
class Group:
    example: Example
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    truncated: torch.Tensor
    rewards: torch.Tensor
    scores: list[float]  # accuracy per response (what dynamic sampling filters on)
    texts: list[str]


def _chunks(n: int, size: int):
    for i in range(0, n, size):
        yield slice(i, min(n, i + size))


class DefenderTrainer:
    def __init__(
        self, policy, examples: list[Example], cfg: DefenderTrainConfig, resume_from: str | Path | None = None
    ):
        if not examples:
            raise ValueError("no training examples: the dataset version is empty")
        self.policy, self.examples, self.cfg = policy, examples, cfg
        policy.share_prompts = cfg.share_prompts  # a group's completions scored after one prompt copy
        self.held_back: list[Example] = []
        if cfg.mode == "sft" and cfg.target_accuracy > 0:
            if len(examples) < 2 * cfg.eval_examples:
                raise ValueError(
                    f"target_accuracy holds back eval_examples={cfg.eval_examples} of {len(examples)} "
                    "examples: give at least twice as many examples or lower eval_examples"
                )
            self.examples, self.held_back = examples[: -cfg.eval_examples], examples[-cfg.eval_examples :]
        cfg.dapo.validate()
        if cfg.sft_weight < 0 or (cfg.sft_weight and cfg.mode != "dapo"):
            raise ValueError(
                f"sft_weight {cfg.sft_weight} with mode {cfg.mode!r}: it weights a supervised term "
                "added to DAPO steps, so set it >= 0 and on a DAPO config (defender.rl.sft_weight)"
            )
        if cfg.lora_rank > 0:
            from peft import LoraConfig, get_peft_model

            policy.model = get_peft_model(
                policy.model,
                LoraConfig(
                    r=cfg.lora_rank,
                    lora_alpha=cfg.lora_alpha,
                    lora_dropout=0.0,
                    target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)",
                ),
            )
        if cfg.gradient_checkpointing:
            policy.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.rank, self.world = dist.rank_world()
        if cfg.batch_prompts % self.world:
            raise ValueError(
                f"batch_prompts {cfg.batch_prompts} must divide over {self.world} ranks: set "
                f"defender.*.batch_prompts to a multiple of {self.world}"
            )
        params = policy.trainable_parameters()
        # fused on a GPU: one kernel per step for all parameters instead of several per tensor list
        # (3.76 B parameters of the 3B defender: params, grads and two moments read and written)
        self.opt = torch.optim.AdamW(
            params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=bool(params) and all(p.is_cuda for p in params)
        )
        self.step = 0
        self.reached = False  # target_accuracy met: training is done before ``steps``
        self.metrics: list[dict] = []
        self.stream = DataStream(len(self.examples), cfg.seed)
        if resume_from is not None:
            state = load_trainer_state(resume_from, self.opt)
            self.step = state["step"]
            self.metrics = state["metrics"]
            self.stream = DataStream(len(self.examples), cfg.seed, **state["data_position"])
            last = self.metrics[-1] if self.metrics else {}
            self.reached = bool(self.held_back) and last.get("heldback_accuracy", -1.0) >= cfg.target_accuracy

    # ------------------------------------------------------------------ SFT
    def sft_step(self) -> dict:
        p, cfg = self.policy, self.cfg
        p.model.train()
        with compiled_layers(p.model, cfg.compile_update):  # forwards *and* backwards: see dapo_step
            loss_sum, total = self._supervised_backward(1.0)
        dist.sum_gradients(p.trainable_parameters())
        gnorm = torch.nn.utils.clip_grad_norm_(p.trainable_parameters(), cfg.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return {"loss": dist.all_sum(loss_sum), "grad_norm": float(gnorm), "tokens": total}

    def _supervised_backward(self, weight: float) -> tuple[float, int]:
        """Backward of ``weight`` x the answers' negative log-likelihood per answer token over the
        next batch_prompts examples (split over the ranks); returns (this rank's unweighted loss,
        the global batch's answer tokens). The SFT step, and DAPO's ``sft_weight`` term."""
        p, cfg = self.policy, self.cfg
        batch = [self.examples[i] for i in self.stream.take(cfg.batch_prompts)]
        ids, mask = p.target_ids([f"\\boxed{{{e.answer}}}" for e in batch])
        total = int(mask.sum())  # the global batch's tokens: every rank knows them
        mine = slice(self.rank * len(batch) // self.world, (self.rank + 1) * len(batch) // self.world)
        batch, ids, mask = batch[mine], ids[mine], mask[mine]
        loss_sum = 0.0
        for sl in _chunks(len(batch), cfg.micro_batch):
            logp = p.response_logprobs([e.image for e in batch[sl]], [e.prompt for e in batch[sl]], ids[sl], mask[sl])
            loss = -(logp * mask[sl].to(logp.device)).sum() / total
            (weight * loss).backward()
            loss_sum += float(loss.detach())
        return loss_sum, total

    # ----------------------------------------------------------------- DAPO
    def _draw(self, draw_index: int) -> list[Group]:
        """Sample G responses for each of the next batch_prompts examples and reward them."""
        p, cfg, G = self.policy, self.cfg, self.cfg.dapo.group_size
        batch = [self.examples[i] for i in self.stream.take(cfg.batch_prompts)]
        batch = batch[self.rank :: self.world]  # this rank's prompts of the draw
        rep = [e for e in batch for _ in range(G)]
        ids, masks, truncs, texts = [], [], [], []
        for k, sl in enumerate(_chunks(len(rep), cfg.rollout_batch or cfg.micro_batch)):
            r = p.rollout(
                [e.image for e in rep[sl]],
                [e.prompt for e in rep[sl]],
                temperature=cfg.temperature,
                max_new_tokens=cfg.max_new_tokens,
                cache=cfg.decode_cache,
                seed=cfg.seed * 1_000_003 + self.step * 1009 + draw_index * 101 + k + 7919 * self.rank,
            )
            ids.append(r.response_ids)
            masks.append(r.response_mask)
            truncs.append(r.truncated)
            texts += r.texts
        width = max(t.shape[1] for t in ids)
        pad = p.tokenizer.pad_token_id
        ids = torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1]), value=pad) for t in ids])
        masks = torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1])) for t in masks])
        truncs = torch.cat(truncs)
        groups = []
        for gi, e in enumerate(batch):
            sl = slice(gi * G, (gi + 1) * G)
            rewards = torch.tensor([mcq_reward(t, e.answer, e.num_options) for t in texts[sl]])
            if cfg.dapo.overlong_penalty:
                rewards = rewards + overlong_penalty(
                    masks[sl].sum(1), cfg.max_new_tokens, cfg.dapo.overlong_cache, cfg.dapo.overlong_factor
                )
            scores = [float(extract_choice(t, e.num_options).letter == e.answer) for t in texts[sl]]
            groups.append(Group(e, ids[sl], masks[sl], truncs[sl], rewards, scores, texts[sl]))
        return groups

    def dapo_step(self) -> dict:
        p, cfg, G = self.policy, self.cfg, self.cfg.dapo.group_size
        t0 = time.perf_counter()
        draws = iter(range(10**9))
        groups, drawn = fill_batch(
            lambda: self._draw(next(draws)), cfg.batch_prompts // self.world, G, cfg.dapo, dist.any_rank
        )
        t_sample = time.perf_counter() - t0
        images = [g.example.image for g in groups for _ in range(G)]
        prompts = [g.example.prompt for g in groups for _ in range(G)]
        width = max(g.response_ids.shape[1] for g in groups)  # groups may come from different draws
        pad = p.tokenizer.pad_token_id
        ids = torch.cat(
            [torch.nn.functional.pad(g.response_ids, (0, width - g.response_ids.shape[1]), value=pad) for g in groups]
        )
        mask = torch.cat(
            [torch.nn.functional.pad(g.response_mask, (0, width - g.response_mask.shape[1])) for g in groups]
        )
        truncated = torch.cat([g.truncated for g in groups])
        rewards = torch.cat([g.rewards for g in groups])
        adv = group_advantages(rewards, G, cfg.dapo.adv_eps)
        loss_mask = mask * (~truncated).long().unsqueeze(1) if cfg.dapo.mask_truncated else mask
        total = max(1, int(dist.all_sum(int(loss_mask.sum()))))  # token-level loss over the *global* batch
        slices = list(_chunks(len(prompts), cfg.micro_batch))
        p.model.train()
        t1 = time.perf_counter()
        # With one update per batch the policy *is* the sampling policy at the update, so its own
        # detached log-probs are the old ones (ratio exactly 1, as TRL does); several epochs need
        # the sampling policy's log-probs first: same function, same micro-batches.
        on_policy = cfg.dapo.epochs_per_batch == 1
        # Scoring forwards run compiled when asked (models/compiled_layers.py), and so must their
        # backwards: with gradient checkpointing a layer's forward is recomputed in the backward,
        # and a recompute running eager code against a compiled forward's saved tensors fails
        # (transformers <= 5.17 checkpoints a layer's whole call, outside the compiled code).
        with compiled_layers(p.model, cfg.compile_update):
            old = [None] * len(slices)
            if not on_policy:
                with torch.no_grad():
                    old = [p.response_logprobs(images[s], prompts[s], ids[s], mask[s], cfg.temperature) for s in slices]
            t_logp = time.perf_counter() - t1
            stats, ents, sft_loss = [], [], 0.0
            for epoch in range(cfg.dapo.epochs_per_batch):
                for s, old_lp in zip(slices, old):
                    logp, ent = p.response_logprobs(
                        images[s], prompts[s], ids[s], mask[s], cfg.temperature, with_entropy=True
                    )
                    old_lp = logp.detach() if old_lp is None else old_lp
                    m = loss_mask[s].to(logp.device)
                    loss, st = dapo_loss(logp, old_lp, adv[s].to(logp.device), m, cfg.dapo, num_tokens=total)
                    loss.backward()
                    stats.append(st)
                    ents.append(float((ent.detach() * mask[s].to(ent.device)).sum()))
                if cfg.sft_weight and epoch == 0:  # once per batch, into the first update
                    sft_loss = self._supervised_backward(cfg.sft_weight)[0]
                dist.sum_gradients(p.trainable_parameters())
                gnorm = torch.nn.utils.clip_grad_norm_(p.trainable_parameters(), cfg.grad_clip)
                self.opt.step()
                self.opt.zero_grad(set_to_none=True)
        n_tok = max(1, sum(s.tokens for s in stats))
        n_all = dist.all_sum(len(groups) * G)
        return {
            "loss": dist.all_sum(sum(s.loss for s in stats)),
            "reward": dist.all_sum(float(rewards.sum())) / n_all,
            "accuracy": dist.all_sum(sum(sum(g.scores) for g in groups)) / n_all,
            "kept_group_fraction": dist.all_sum(len(groups)) / dist.all_sum(drawn),
            "response_length": float(mask.sum(1).float().mean()),
            "entropy": sum(ents) / max(1, int(mask.sum())),
            "clip_fraction": sum(s.clip_fraction * s.tokens for s in stats) / n_tok,
            "ratio_max": max(s.ratio_max for s in stats),
            "grad_norm": float(gnorm),
            "tokens": total,
            **({"sft_loss": dist.all_sum(sft_loss)} if cfg.sft_weight else {}),
            "sample_seconds": t_sample,
            "logprob_seconds": t_logp,
            "update_seconds": time.perf_counter() - t1 - t_logp,
        }

    # ------------------------------------------------------------------ loop
    def lr_at(self, step: int) -> float:
        """Learning rate of optimizer step ``step`` (0-based): a function of the step alone, so a
        resumed run continues the schedule exactly."""
        cfg = self.cfg
        if cfg.lr_warmup_steps and step < cfg.lr_warmup_steps:
            return cfg.lr * (step + 1) / cfg.lr_warmup_steps
        if cfg.lr_schedule == "cosine":
            span = max(1, cfg.steps - cfg.lr_warmup_steps)
            progress = min(1.0, (step - cfg.lr_warmup_steps) / span)
            return cfg.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))
        return cfg.lr

    def train(
        self, out_dir: str | Path | None = None, steps: int | None = None, on_step: Callable[[dict], None] | None = None
    ) -> list[dict]:
        until = self.cfg.steps if steps is None else min(self.cfg.steps, self.step + steps)
        while self.step < until and not self.reached:
            t0 = time.perf_counter()
            lr = self.lr_at(self.step)
            for group in self.opt.param_groups:
                group["lr"] = lr
            row = self.sft_step() if self.cfg.mode == "sft" else self.dapo_step()
            self.step += 1
            row = {"step": self.step, "lr": lr, "seconds": time.perf_counter() - t0, **row}
            reached = False
            if self.held_back and (self.step % self.cfg.eval_every == 0 or self.step == until):
                answers = answer_items(self.policy, self.held_back)
                row["heldback_accuracy"] = sum(a["correct"] for a in answers) / len(answers)
                reached = row["heldback_accuracy"] >= self.cfg.target_accuracy
            self.metrics.append(row)
            if on_step:
                on_step(row)
            if out_dir and self.cfg.checkpoint_every and self.step % self.cfg.checkpoint_every == 0:
                self.save(Path(out_dir) / f"step-{self.step:06d}")
            if reached:
                self.reached = True
                break
        if out_dir:
            self.save(out_dir)
        return self.metrics

    def save(self, folder: str | Path) -> Path:
        return save_checkpoint(
            folder,
            self.policy,
            self.opt,
            {
                "step": self.step,
                "data_position": self.stream.position(),
                "metrics": self.metrics,
                "config": dataclasses.asdict(self.cfg),
            },
        )
