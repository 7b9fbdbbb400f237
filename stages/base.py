"""What a bootstrap stage is: a pure function over one shard, plus what its version depends on.

The stage's name is everything's name: its config section (``--set implant.*``), its module
(``stages/implant.py``), its flow and its folder in the store (``ROOT/<dataset>/implant/``).
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import Any, Callable

import polars as pl

from config import PipelineConfig


class StageError(RuntimeError):
    """A stage cannot run as configured (not a bad row: those become rejects)."""


@dataclass
class ShardContext:
    stage: str
    config: PipelineConfig
    index: int
    start: int = 0  # row range, for stages that create rows (source)
    stop: int = 0

    def model(self, role: str) -> Any:
        from stages.registry import load

        return load(role, self.config.model_spec(role))


ShardFn = Callable[[pl.DataFrame, ShardContext], tuple[pl.DataFrame, pl.DataFrame]]


@dataclass(frozen=True)
class Stage:
    name: str  # = its config section, module and folder
    roles: tuple[str, ...]  # model roles it uses
    parent: str | None  # the stage whose version it takes as input
    function: str  # the shard function's name in ``stages.<name>``
    title: str = ""
    readme: str | None = None  # name of the dataset-card function in ``stages.<name>``, if any

    @property
    def module(self) -> str:
        return f"stages.{self.name}"

    def _attr(self, name: str) -> Any:
        return getattr(importlib.import_module(self.module), name)

    @property
    def run(self) -> ShardFn:
        return self._attr(self.function)

    def card(self, summary: dict) -> str | None:
        return self._attr(self.readme)(summary) if self.readme else None

    def version_config(self, cfg: PipelineConfig) -> dict:
        """The part of the config this stage's output depends on (hashed into its version id)."""
        out: dict = {self.name: dataclasses.asdict(getattr(cfg, self.name))}
        if self.roles:
            out["models"] = {r: cfg.models[r] for r in self.roles}
        return out


# source -> extend (Stage 1 outpainting) -> filter (Stage 1 checks) -> implant (Stage 2) -> export.
STAGES: dict[str, Stage] = {
    "source": Stage("source", (), None, "generate_scenes", "Synthetic source scenes"),
    "extend": Stage("extend", ("outpainter",), "source", "extend_scenes", "Stage 1: scene extension"),
    "filter": Stage("filter", ("clip", "judge"), "extend", "filter_scenes", "Stage 1: quality filtering"),
    "implant": Stage(
        "implant",
        ("judge", "inpainter", "detector", "segmenter", "defender"),
        "filter",
        "implant_distractors",
        "Stage 2: distractor implantation",
    ),
    "export": Stage("export", (), "implant", "export_sft", "AOT-SFT export", "dataset_card"),
}
BOOTSTRAP = tuple(STAGES)
