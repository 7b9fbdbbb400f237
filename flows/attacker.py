"""Attacker flows: train it (cold start or Flow-GRPO against a frozen defender), and let the
frozen attacker generate a curriculum for the defender.

Each returns a version id with lineage: an attacker version's parents are its dataset version,
the frozen defender (Flow-GRPO) and its starting attacker; a curriculum's are the attacker, the
data it attacked and the defender that scored the efficacy.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.bootstrap import DEFAULT_ROOT, resolve_config
from storage import ShardStore
from tasks.training import (
    generate_curriculum_task,
    publish_curriculum_artifacts,
    publish_training_artifacts,
    train_attacker_task,
)


@flow(
    name="train-attacker",
    description="Cold start (flow matching on AOT-SFT pairs) or Flow-GRPO of the attacker.",
    validate_parameters=True,
)
def train_attacker(
    data_version: str,
    defender_version: str | None = None,
    init_version: str | None = None,
    mode: str = "sft",
    root: str = DEFAULT_ROOT,
    preset: str = "synthetic",
    overrides: dict[str, Any] | None = None,
    storage_options: dict[str, Any] | None = None,
) -> dict:
    cfg = resolve_config(preset, overrides)
    out = train_attacker_task(data_version, defender_version, init_version, mode, cfg.to_dict(), root, storage_options)
    publish_training_artifacts(ShardStore(root, storage_options), out["version"])
    return out


@flow(
    name="generate-curriculum",
    description="The frozen attacker edits fresh items; kept edits mixed with clean ones.",
    validate_parameters=True,
)
def generate_curriculum(
    attacker_version: str,
    data_version: str,
    defender_version: str,
    root: str = DEFAULT_ROOT,
    preset: str = "synthetic",
    overrides: dict[str, Any] | None = None,
    storage_options: dict[str, Any] | None = None,
) -> dict:
    cfg = resolve_config(preset, overrides)
    out = generate_curriculum_task(
        attacker_version, data_version, defender_version, cfg.to_dict(), root, storage_options
    )
    publish_curriculum_artifacts(ShardStore(root, storage_options), out["version"])
    return out
