"""Defender flows: train it (SFT warm-up or DAPO) on a dataset version, evaluate it on one.

Each returns a version id with lineage: a defender version's parents are its dataset version(s)
and its starting checkpoint; an evaluation version's parents are the checkpoint and the data.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.bootstrap import DEFAULT_ROOT, resolve_config
from storage import ShardStore
from tasks.training import (
    evaluate_defender_task,
    publish_eval_artifact,
    publish_training_artifacts,
    train_defender_task,
)


@flow(
    name="train-defender",
    description="Supervised warm-up or DAPO of the defender on a dataset version.",
    validate_parameters=True,
)
def train_defender(
    data_version: str,
    init_version: str | None = None,
    mode: str = "sft",
    root: str = DEFAULT_ROOT,
    preset: str = "synthetic",
    overrides: dict[str, Any] | None = None,
    storage_options: dict[str, Any] | None = None,
    also_versions: list[str] | None = None,
) -> dict:
    """``also_versions``: further dataset versions trained on beside ``data_version`` (the
    co-evolution loop's earlier curricula, ``coevolution.curriculum_replay``)."""
    cfg = resolve_config(preset, overrides)
    out = train_defender_task(data_version, init_version, mode, cfg.to_dict(), root, storage_options, also_versions)
    publish_training_artifacts(ShardStore(root, storage_options), out["version"])
    return out


@flow(
    name="evaluate-defender",
    description="Accuracy of a defender version on clean and adversarial images.",
    validate_parameters=True,
)
def evaluate_defender(
    checkpoint_version: str,
    data_version: str,
    root: str = DEFAULT_ROOT,
    preset: str = "synthetic",
    overrides: dict[str, Any] | None = None,
    storage_options: dict[str, Any] | None = None,
) -> dict:
    cfg = resolve_config(preset, overrides)
    out = evaluate_defender_task(checkpoint_version, data_version, cfg.to_dict(), root, storage_options)
    publish_eval_artifact(out)
    return out
