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

        spec = self.config.models[role]
        if role == "defender" and isinstance(spec, dict) and "warmup" in spec:
            # A warmed tiny defender learns this run's world (question mix, object sizes), not
            # the default one; the world is part of its spec, so of its cache key.
            spec = {**spec, "warmup": {"source": dataclasses.asdict(self.config.source), **spec["warmup"]}}
        return load(role, spec)


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
