"""The defender trainer's typed config (no torch import)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from rl.config import DapoConfig


def _f(default, help: str):
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        return field(default_factory=lambda: type(default)() if dataclasses.is_dataclass(default) else type(default)(default),
                     metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class DefenderTrainConfig:
    mode: str = _f("dapo", "'sft' (supervised warm-up on the answer) or 'dapo' (RL).")
    steps: int = _f(100, "Optimizer steps. AOT's warm-up RL stage: 100 steps on 900 clean samples (METHOD.md).")
    batch_prompts: int = _f(16, "Prompts per step (AOT: 128 on 8 GPUs; smaller by default to fit one card).")
    micro_batch: int = _f(32, "Sequences per forward/backward; the loss is normalized over the whole batch.")
    lr: float = _f(1e-6, "AdamW learning rate. AOT: 1e-6 for the 7B defender (METHOD.md).")
    weight_decay: float = _f(1e-2, "AdamW weight decay. AOT: 1e-2.")
    grad_clip: float = _f(1.0, "Max global gradient norm. AOT: 1.0.")
    temperature: float = _f(1.0, "Sampling temperature of rollouts. AOT: 1.0.")
    max_new_tokens: int = _f(8, "Response length cap. AOT: 4096; the tiny defender answers in 2 tokens.")
    seed: int = _f(0, "Seed of data order and sampling.")
    lora_rank: int = _f(0, "LoRA rank (peft) on the language model's attention; 0 = full fine-tuning (AOT "
                           "trains everything, vision tower included).")
    lora_alpha: int = _f(16, "LoRA alpha.")
    gradient_checkpointing: bool = _f(False, "Recompute activations in the backward pass to save memory.")
    checkpoint_every: int = _f(0, "Save a checkpoint every N steps (0: only at the end).")
    dapo: DapoConfig = _f(DapoConfig(), "DAPO settings (rl/dapo.py).")
