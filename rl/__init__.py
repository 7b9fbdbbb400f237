"""RL algorithm cores as plain PyTorch functions (they import only torch and model interfaces)."""

from rl.dapo import DapoConfig, DynamicSamplingError, dapo_loss, fill_batch, group_advantages, keep_groups, overlong_penalty

__all__ = ["DapoConfig", "DynamicSamplingError", "dapo_loss", "fill_batch", "group_advantages", "keep_groups",
           "overlong_penalty"]
