"""What a stage is: a pure function over one shard, plus what its version depends on."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import polars as pl

from stages.config import PipelineConfig


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
        from models import load

        return load(role, self.config.model_spec(role))


ShardFn = Callable[[pl.DataFrame, ShardContext], tuple[pl.DataFrame, pl.DataFrame]]


@dataclass(frozen=True)
class Stage:
    name: str
    section: str | None  # config section the stage reads
    roles: tuple[str, ...]  # model roles it uses
    parent: str | None  # the stage whose version it takes as input
    run: ShardFn
    title: str = ""
    readme: Callable[[dict], str] | None = None  # dataset card, from the manifest's summary

    def version_config(self, cfg: PipelineConfig) -> dict:
        """The part of the config this stage's output depends on (hashed into its version id)."""
        out: dict = {}
        if self.section:
            out[self.section] = dataclasses.asdict(getattr(cfg, self.section))
        if self.roles:
            out["models"] = {r: cfg.models[r] for r in self.roles}
        return out
