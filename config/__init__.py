"""Every typed config of the project and its presets (no import of models, training or stages).

``load_config(preset, overrides)`` resolves a run's ``PipelineConfig``: defaults <- preset <-
``--set`` overrides, checked by pydantic against the typed sections.
"""

from config.fields import Int, documented, settings
from config.loading import (
    PRESET_DIR,
    available_presets,
    config_from_dict,
    dotted_pairs,
    load_config,
    nest_dotted,
    parse_overrides,
)
from config.pipeline import RUN_ONLY_SOURCE_FIELDS, ConfigError, PipelineConfig, canvas_scale_range
from config.rl import DapoConfig, FlowGrpoConfig
from config.training import AttackerRewardConfig, AttackerTrainConfig, DefenderTrainConfig

__all__ = [
    "PRESET_DIR",
    "RUN_ONLY_SOURCE_FIELDS",
    "AttackerRewardConfig",
    "AttackerTrainConfig",
    "ConfigError",
    "DapoConfig",
    "DefenderTrainConfig",
    "FlowGrpoConfig",
    "Int",
    "PipelineConfig",
    "available_presets",
    "canvas_scale_range",
    "config_from_dict",
    "documented",
    "dotted_pairs",
    "load_config",
    "nest_dotted",
    "parse_overrides",
    "settings",
]
