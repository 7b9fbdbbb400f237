"""The defender trainer's typed config (no torch import)."""

from __future__ import annotations

from dataclasses import dataclass

from config_fields import documented
from rl.config import DapoConfig


@dataclass
class DefenderTrainConfig:
    mode: str = documented("dapo", "'sft' (supervised warm-up on the answer) or 'dapo' (RL).")
    steps: int = documented(100, "Optimizer steps. AOT's warm-up RL stage: 100 steps on 900 clean samples (METHOD.md).")
    batch_prompts: int = documented(16, "Prompts per step (AOT: 128 on 8 GPUs; smaller by default to fit one card).")
    micro_batch: int = documented(32, "Sequences per forward/backward; the loss is normalized over the whole batch.")
    lr: float = documented(1e-6, "AdamW learning rate. AOT: 1e-6 for the 7B defender (METHOD.md).")
    weight_decay: float = documented(1e-2, "AdamW weight decay. AOT: 1e-2.")
    grad_clip: float = documented(1.0, "Max global gradient norm. AOT: 1.0.")
    temperature: float = documented(1.0, "Sampling temperature of rollouts. AOT: 1.0.")
    max_new_tokens: int = documented(8, "Response length cap. AOT: 4096; the tiny defender answers in 2 tokens.")
    seed: int = documented(0, "Seed of data order and sampling.")
    lora_rank: int = documented(0, "LoRA rank (peft) on the language model's attention; 0 = full fine-tuning (AOT "
                           "trains everything, vision tower included).")
    lora_alpha: int = documented(16, "LoRA alpha.")
    decode_cache: str = documented("dynamic", "KV cache of rollouts: 'dynamic', or 'static' (preallocated; on CUDA "
                                            "transformers then compiles the decoding step, see RESULTS.md).")
    gradient_checkpointing: bool = documented(False, "Recompute activations in the backward pass to save memory.")
    checkpoint_every: int = documented(0, "Save a checkpoint every N steps (0: only at the end).")
    dapo: DapoConfig = documented(DapoConfig(), "DAPO settings (rl/dapo.py).")
