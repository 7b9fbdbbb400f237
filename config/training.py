"""The trainers' typed configs: defender (SFT / DAPO) and attacker (cold start / Flow-GRPO). No torch import."""

from __future__ import annotations

from typing import Literal

from config.fields import Int, documented, settings
from config.rl import DapoConfig, FlowGrpoConfig


@settings
class DefenderTrainConfig:
    mode: str = documented("dapo", "'sft' (supervised warm-up on the answer) or 'dapo' (RL).")
    steps: Int = documented(100, "Optimizer steps. AOT's warm-up RL stage: 100 steps on 900 clean samples (METHOD.md).")
    batch_prompts: Int = documented(16, "Prompts per step (AOT: 128 on 8 GPUs; smaller by default to fit one card).")
    micro_batch: Int = documented(32, "Sequences per forward/backward; the loss is normalized over the whole batch.")
    rollout_batch: Int = documented(
        0,
        "Sequences per rollout (generate) call; 0: micro_batch. Sampling keeps no "
        "activations for a backward pass, so it can take larger batches than the update "
        "(fewer, fuller decoding steps; experiments/RESULTS.md).",
    )
    lr: float = documented(1e-6, "AdamW learning rate. AOT: 1e-6 for the 7B defender (METHOD.md).")
    weight_decay: float = documented(1e-2, "AdamW weight decay. AOT: 1e-2.")
    lr_warmup_steps: Int = documented(
        0,
        "Linear learning-rate warm-up from 0 over this many steps (0: none; AOT's "
        "RL runs use a constant rate). A defender trained from scratch needs one.",
    )
    lr_schedule: str = documented(
        "constant",
        "'constant', or 'cosine': decay to 10% of lr at the last step (the "
        "usual schedule for training transformers from scratch, e.g. nanoGPT).",
    )
    target_accuracy: float = documented(
        0.0,
        "SFT only: stop once greedy accuracy on ``eval_examples`` examples held "
        "back from training reaches this; ``steps`` is then the cap (0: run every "
        "step). Issue 8: warm up 'until clean accuracy is well above chance'.",
    )
    eval_every: Int = documented(100, "Steps between those accuracy checks (with target_accuracy).")
    eval_examples: Int = documented(
        256, "Examples held back for those checks, never trained on (with target_accuracy)."
    )
    grad_clip: float = documented(1.0, "Max global gradient norm. AOT: 1.0.")
    temperature: float = documented(1.0, "Sampling temperature of rollouts. AOT: 1.0.")
    max_new_tokens: Int = documented(8, "Response length cap. AOT: 4096; the tiny defender answers in 2 tokens.")
    seed: Int = documented(0, "Seed of data order and sampling.")
    lora_rank: Int = documented(
        0,
        "LoRA rank (peft) on the language model's attention; 0 = full fine-tuning (AOT "
        "trains everything, vision tower included).",
    )
    lora_alpha: Int = documented(16, "LoRA alpha.")
    decode_cache: Literal["dynamic", "static", "loop", "graph"] = documented(
        "dynamic",
        "How rollouts decode: transformers' generate with a 'dynamic' or a 'static' KV cache "
        "(preallocated; on CUDA transformers then compiles the decoding step, "
        "experiments/RESULTS.md), or 'loop': the static cache and compiled step in our own "
        "loop, which keeps the tokens on the device and waits on the GPU only every 16 tokens "
        "(models/decoding.py; generate stops to check for EOS after every token, issue 23); "
        "'graph': that loop with the whole step captured as one CUDA graph, one launch per token "
        "(CUDA only; on an H100 it gave the loop's tokens but generated 58% slower than 'loop', "
        "experiments/RESULTS.md).",
    )
    gradient_checkpointing: bool = documented(False, "Recompute activations in the backward pass to save memory.")
    compile_update: bool = documented(
        False,
        "Run the language model's decoder layers compiled (torch.compile) in the "
        "update's forward and backward (models/compiled_layers.py): fused norms, "
        "activations and rotary embeddings; the first steps pay the compilation. "
        "Off by default (inductor's compile time outweighs it on a CPU); the full "
        "preset turns it on (GPU gain: experiments/RESULTS.md).",
    )
    share_prompts: bool = documented(
        False,
        "Score the rows that repeat a prompt (a group's G completions) as one packed row: the prompt "
        "once, then each completion, which sees the prompt and its own tokens only "
        "(models/shared_prompts.py; equal log-probs and gradients). Most of a GRPO update's tokens are "
        "repeated prompts, but the packed rows' arbitrary mask takes SDPA's memory-efficient kernel "
        "and on a GPU the update gained far less than its tokens (experiments/RESULTS.md): off by default.",
    )
    checkpoint_every: Int = documented(0, "Save a checkpoint every N steps (0: only at the end).")
    sft_weight: float = documented(
        0.0,
        "DAPO only: weight of a supervised term added to every DAPO step, the answer's negative "
        "log-likelihood per answer token on the next batch_prompts examples (after the step's "
        "rollouts are drawn). 0: DAPO alone, as AOT trains its defender (METHOD.md); anything "
        "else departs from the paper. Why offer it: dynamic sampling drops the groups a defender "
        "gets all wrong, which on attacked images are the ones to learn from, and on the "
        "synthetic world labelled attacked images taught robustness that DAPO did not "
        "(experiments/RESULTS.md, 'A binding defender 0').",
    )
    dapo: DapoConfig = documented(DapoConfig(), "DAPO settings (rl/dapo.py).")


EFFICACY_KINDS = ("sampled", "dense")  # attacker.rl.reward.efficacy; training/attacker_rewards.py
INVALID_SCORES = ("fixed", "group", "skip", "dual")  # attacker.rl.reward.invalid_score


@settings
class AttackerRewardConfig:
    tau: float = documented(
        0.9,
        "Integrity gate: every target box's localized SSIM must be >= tau (METHOD.md, "
        "'Attacker reward'; the paper states only integrity x efficacy).",
    )
    global_floor: float = documented(0.0, "Optional global SSIM floor against repainting the whole image (0 = off).")
    queries: Int = documented(
        3,
        "K: the frozen defender is asked K times; efficacy = wrong answers before the first "
        "right one / K (METHOD.md default 3).",
    )
    temperature: float = documented(1.0, "Sampling temperature of the defender's K answers (1: the K differ).")
    invalid_penalty: float = documented(
        0.0,
        "Reward of an edit that fails integrity (METHOD.md: 0, configurable). Never above the lowest "
        "valid reward: with efficacy 'dense' (down to -1) at most -1, else a broken edit outscores a "
        "valid one that helps the defender and Flow-GRPO learns to break the gate (RESULTS.md).",
    )
    invalid_score: Literal["fixed", "group", "skip", "dual"] = documented(
        "fixed",
        "How an edit that fails integrity is scored: 'fixed', invalid_penalty (METHOD.md); 'group', just "
        "below the lowest valid edit of the same group (its reward minus the valid rewards' standard "
        "deviation, at least 0.05 below). Ours: with a fixed -1 under dense efficacy (valid edits "
        "spread over ~0.1-0.3), one broken edit in a group of 8 takes most of the group's reward "
        "variance, so the normalized advantages mostly say 'do not break the gate' and barely rank "
        "the valid edits by how much they fool the defender (RESULTS.md). 'skip': no reward and no "
        "advantage (the group's mean and std come from its valid edits only): under 'group' the phase "
        "learned integrity at efficacy's cost (training integrity 0.38 -> 0.71, valid efficacy "
        "0.19 -> 0.09 in 96 steps), since smaller edits break the target less and fool less. 'skip' "
        "did the opposite (training integrity 0.42 -> 0.09, valid efficacy 0.14 -> 0.32). 'dual': the "
        "valid edits' mean minus a price that dual ascent sets so the integrity rate holds at "
        "integrity_target (constrained RL, Tessler et al. 2019).",
    )
    integrity_target: float = documented(
        0.5,
        "invalid_score 'dual': the share of a group's edits that must keep the targets intact; the "
        "price of a broken edit rises while fewer do and falls (to 0) while more do. Ours: the "
        "tiny cold start keeps 0.4-0.45 of its SDE samples intact.",
    )
    dual_lr: float = documented(
        0.05,
        "invalid_score 'dual': how far the price moves per group and unit of integrity shortfall "
        "(reward units; dense efficacies spread over ~0.1-0.3, so a shortfall of 0.2 reaches a "
        "price of 0.3 in ~30 groups).",
    )
    efficacy: str = documented(
        "sampled",
        "Efficacy in attacker training: 'sampled', the paper's consecutive failures of K sampled "
        "answers; 'dense', P(right letter | clean) - P(right letter | edited) from the defender's "
        "scoring forwards (ours: K samples of a defender that errs on a third of clean images are "
        "mostly its own noise). Curricula and held-out scores always use 'sampled'.",
    )


@settings
class AttackerTrainConfig:
    mode: str = documented("grpo", "'sft' (cold start: flow matching on AOT-SFT pairs) or 'grpo' (Flow-GRPO).")
    steps: Int = documented(100, "Optimizer steps.")
    groups_per_step: Int = documented(
        2,
        "Prompts (groups of group_size edits each) per optimizer step; each group "
        "is one sampling and one training micro-batch (kept identical, METHOD.md).",
    )
    micro_batch: Int = documented(
        0,
        "Edits per sampling and training micro-batch within a group (0: the whole group); in the "
        "cold start, pairs per forward (0: every pair of one edit size at once). "
        "Both phases use the same split, so the first ratio stays exactly 1.",
    )
    sft_batch: Int = documented(8, "Pairs per cold-start step.")
    edit_weight: float = documented(
        0.0,
        "Cold start: extra weight of the latent tokens the pair's edit changed, in proportion to the "
        "change (token weight 1 + edit_weight x |edited - clean| / its max, the loss normalized by "
        "the weights). 0 = plain flow matching. Ours: a distractor covers a few percent of the "
        "tokens, so plain flow matching mostly learns to copy the scene (RESULTS.md).",
    )
    lr: float = documented(3e-4, "AdamW learning rate of the LoRA (Qwen-Image-Edit Flow-GRPO reference: 3e-4).")
    weight_decay: float = documented(1e-4, "AdamW weight decay (Flow-GRPO reference 1e-4).")
    grad_clip: float = documented(1.0, "Max global gradient norm (Flow-GRPO reference 1.0).")
    lora_rank: Int = documented(64, "LoRA rank on the transformer's attention and image MLP (reference: 64).")
    lora_alpha: Int = documented(128, "LoRA alpha (reference: 128).")
    seed: Int = documented(0, "Seed of data order, initial noise and SDE noise.")
    async_rewards: bool = documented(True, "Score a group in a worker thread while the next group is sampled.")
    gradient_checkpointing: bool = documented(False, "Recompute transformer activations in backward (memory).")
    checkpoint_keep_blocks: Int = documented(
        0,
        "With gradient_checkpointing: the last N transformer blocks keep their "
        "activations instead (each saves 1/num_layers of the recompute for its "
        "activations' memory: speed for memory, experiments/RESULTS.md).",
    )
    compile: bool = documented(
        False,
        "torch.compile each transformer block (diffusers' compile_repeated_blocks): "
        "faster per group on a GPU (experiments/RESULTS.md); GPU only.",
    )
    checkpoint_every: Int = documented(0, "Save a checkpoint every N steps (0: only at the end).")
    flow_grpo: FlowGrpoConfig = documented(FlowGrpoConfig(), "Flow-GRPO settings (rl/flow_grpo.py).")
    reward: AttackerRewardConfig = documented(AttackerRewardConfig(), "Integrity x efficacy reward settings.")
