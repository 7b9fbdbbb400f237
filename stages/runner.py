"""Plan, run and commit a stage over shards — the pure core that Prefect tasks wrap.

``plan`` fixes the output version id (content hash of stage, stage config, code version and
input version) and the shards; ``run_shard`` computes one shard unless the store already holds
it; ``commit`` writes the manifest. ``run_stage`` chains them serially for tests and scripts.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

from config import PipelineConfig
from stages.base import BOOTSTRAP, STAGES, ShardContext, Stage, StageError
from stages.faults import maybe_inject
from stages.version import code_version, kernel_family, version_id
from storage import Manifest, ShardRecord, ShardStore, StorageError, content_hash
from training.tracking import RunTracker


@dataclass(frozen=True)
class Shard:
    index: int
    input_key: str  # sha256 of the input part, or a hash of the row range for source stages
    input_part: str | None = None  # input part path relative to the input version
    start: int = 0
    stop: int = 0


@dataclass
class StagePlan:
    stage: str
    dataset: str
    version: str
    parents: list[str]
    config: dict  # the stage's share of the config (what the version id hashes)
    code_version: str
    shards: list[Shard]
    input_version: str | None = None
    input_stage: str | None = None
    committed: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "StagePlan":
        d = dict(d)
        d["shards"] = [Shard(**s) for s in d["shards"]]
        return cls(**d)


@dataclass
class StageSummary:
    stage: str
    version: str
    rows_in: int
    rows: int
    rejected: int
    shards: int
    recomputed: int
    seconds: float
    reasons: dict[str, int] = field(default_factory=dict)
    reused_version: bool = False  # the whole version already existed: no shard was looked at
    cached: int = 0  # shards served by Prefect's result cache (the task body never ran)

    def to_dict(self) -> dict:
        return asdict(self)


def get_stage(name: str) -> Stage:
    if name not in STAGES:
        raise StageError(f"unknown stage {name!r}; stages are: {', '.join(STAGES)}")
    return STAGES[name]


def stage_identity(stage: Stage, cfg: PipelineConfig) -> tuple[str, dict | None]:
    """(code version, kernel family or None) of a stage as configured: the code of the stage's
    module, this runner and the backends of its roles; the kernel family where any backend is a
    learned model (stages/version.py)."""
    from stages.registry import backend

    backends = [(backend(r, cfg.model_spec(r)), cfg.model_spec(r)) for r in stage.roles]
    code = code_version([stage.module, __name__, *(m for b, _ in backends for m in b.code)])
    learned = [spec for b, spec in backends if not b.exact]
    devices = [spec.get("device", "cpu") if isinstance(spec, dict) else "cpu" for spec in learned]
    return code, (kernel_family(devices) if learned else None)


def stage_version(stage: Stage, cfg: PipelineConfig, parents: list[str]) -> tuple[str, dict, str]:
    """(version id, the config it hashes, code version) of ``stage`` on ``parents``."""
    vcfg = stage.version_config(cfg)
    code, kernels = stage_identity(stage, cfg)
    version = version_id(stage.name, vcfg, parents, code, kernels)
    if kernels:  # recorded with the config in the manifest: which kernels made these bytes
        vcfg = {**vcfg, "kernels": kernels}
    return version, vcfg, code


def planned_versions(cfg: PipelineConfig, until: str = "export") -> dict[str, str]:
    """The version id every bootstrap stage of ``cfg`` gets (from synthetic scenes), computed
    without running anything: what a run would find in, or add to, the store."""
    out, parents = {}, []
    for name in BOOTSTRAP[: BOOTSTRAP.index(until) + 1]:
        out[name] = stage_version(get_stage(name), cfg, parents)[0]
        parents = [out[name]]
    return out


def check_scenes(store: ShardStore, stage: Stage, cfg: PipelineConfig, input_version: str | None) -> None:
    """The synthetic world's oracles answer from a row's scene, which imported photos do not have:
    fail before any shard runs, naming the fix, rather than on the first row."""
    from stages.registry import backend

    oracles = [r for r in stage.roles if backend(r, cfg.model_spec(r)).exact]
    m = store.manifest(input_version) if oracles and input_version else None
    while m is not None and m.stage != "source" and m.parents:
        m = store.manifest(m.parents[0])
    if m is not None and m.stage == "source" and "records" in (m.extra or {}):
        raise StageError(
            f"stage {stage.name}: the synthetic {oracles[0]} answers from a scene's metadata, and "
            f"{input_version} comes from imported photos (aot import), which have none: run them with "
            "--preset tiny (every real model class, random weights) or --preset full"
        )


def check_chain(store: ShardStore, cfg: PipelineConfig, source_version: str | None) -> None:
    """``check_scenes`` for every bootstrap stage a run on ``source_version`` will reach."""
    for name in BOOTSTRAP[1:]:
        check_scenes(store, get_stage(name), cfg, source_version)


def plan(store: ShardStore, stage_name: str, cfg: PipelineConfig, input_version: str | None = None) -> StagePlan:
    stage = get_stage(stage_name)
    check_scenes(store, stage, cfg, input_version)
    if stage.parent is None:
        n = cfg.source.num_scenes
        size = cfg.source.shard_size
        shards = [
            Shard(i, content_hash({"rows": [i * size, min(n, (i + 1) * size)]}), None, i * size, min(n, (i + 1) * size))
            for i in range(math.ceil(n / size))
        ]
        parents: list[str] = []
        dataset = cfg.dataset
        in_stage = None
    else:
        if not input_version:
            raise StageError(
                f"stage {stage_name} needs --input VERSION (a {stage.parent} version; list them with `aot ls`)"
            )
        src = store.manifest(input_version)
        if src.stage != stage.parent:
            raise StageError(
                f"stage {stage_name} takes a {stage.parent} version, but {input_version} is a {src.stage} version"
            )
        shards = [Shard(i, ref.sha256, ref.path) for i, ref in enumerate(src.parts)]
        parents = [src.version]
        dataset = src.dataset
        in_stage = src.stage
    version, vcfg, code = stage_version(stage, cfg, parents)
    committed = store.manifest_at(dataset, stage_name, version) is not None
    return StagePlan(stage_name, dataset, version, parents, vcfg, code, shards, input_version, in_stage, committed)


def run_shard(store: ShardStore, p: StagePlan, shard: Shard, cfg: PipelineConfig) -> tuple[ShardRecord, bool]:
    """Compute one shard, or return the stored one. Returns (record, recomputed)."""
    done = store.finished_shard(p.dataset, p.stage, p.version, shard.index, shard.input_key)
    if done is not None:
        return done, False
    maybe_inject(p.stage, shard.index, store)
    stage = get_stage(p.stage)
    if p.input_version:
        src = store.manifest_at(p.dataset, p.input_stage, p.input_version)
        if src is None:  # it was committed when the stage was planned
            raise StorageError(
                f"input version {p.input_version} ({p.input_stage}) is gone from {store.root_url}: "
                "its manifest was there when this stage started (was the store wiped?); rerun the "
                "command to rebuild it"
            )
        ref = next(r for r in src.parts if r.path == shard.input_part)
        rows = store.read_part(src, ref)
    else:
        import polars as pl

        rows = pl.DataFrame()
    ctx = ShardContext(p.stage, cfg, shard.index, shard.start, shard.stop)
    out, rejects = stage.run(rows, ctx)
    rows_in = rows.height if p.input_version else shard.stop - shard.start
    if out.height + rejects.height != rows_in:
        # Every input row must come out kept or rejected: anything else is silent loss (or a bug).
        raise StageError(
            f"stage {p.stage} shard {shard.index}: {rows_in} rows in, {out.height} kept + {rejects.height} rejected"
        )
    record = store.write_shard(p.dataset, p.stage, p.version, shard.index, shard.input_key, rows_in, out, rejects)
    return record, True


def stage_counts(records: list[ShardRecord]) -> dict[str, int]:
    """A data stage's rows in, kept and rejected, and each reject reason (``reject/<reason>``):
    the numbers a tracker shows for it."""
    counts = {
        "rows_in": sum(r.rows_in for r in records),
        "rows": sum(r.data.rows for r in records),
        "rejects": sum(r.rejects.rows for r in records),
    }
    for r in records:
        for reason, n in r.reasons.items():
            counts[f"reject/{reason}"] = counts.get(f"reject/{reason}", 0) + n
    return counts


def commit(store: ShardStore, p: StagePlan, records: list[ShardRecord], report_to: list[str] = ()) -> Manifest:
    """Make the stage's version visible. With ``report_to`` (``tracking.report_to``) its counts and
    reject reasons also go to the trackers, one run per version with its config and ids; the
    TensorBoard events become the version's files (under ``tensorboard/``)."""
    stage = get_stage(p.stage)
    existing = store.manifest_at(p.dataset, p.stage, p.version)
    if existing is not None:
        return existing
    summary = {
        "dataset": p.dataset,
        "stage": p.stage,
        "version": p.version,
        "parents": p.parents,
        "rows": sum(r.data.rows for r in records),
        "config": p.config,
        "code_version": p.code_version,
    }
    readme = stage.card(summary)
    with tempfile.TemporaryDirectory() as tmp:
        tags = {"stage": p.stage, "version": p.version, "parents": p.parents}
        with RunTracker(list(report_to), os.path.join(tmp, "tensorboard"), p.config, tags) as tracker:
            tracker.log(stage_counts(records), step=0)
        files = store.put_folder(p.dataset, p.stage, p.version, tmp) if os.listdir(tmp) else None
        return store.commit(
            p.dataset,
            p.stage,
            p.version,
            records,
            config=p.config,
            parents=p.parents,
            code_version=p.code_version,
            readme=readme,
            files=files,
        )


def summarize(m: Manifest, shards: int, recomputed: int, seconds: float, reused: bool, cached: int = 0) -> StageSummary:
    return StageSummary(
        m.stage,
        m.version,
        m.rows_in,
        m.rows,
        m.reject_rows,
        shards,
        recomputed,
        seconds,
        dict(m.reasons),
        reused,
        cached,
    )


def run_stage(
    store: ShardStore,
    stage_name: str,
    cfg: PipelineConfig,
    input_version: str | None = None,
    on_shard: Callable[[ShardRecord, bool], None] | None = None,
) -> StageSummary:
    """Run a stage serially in this process (no Prefect): for tests, scripts and benchmarks."""
    t0 = time.perf_counter()
    p = plan(store, stage_name, cfg, input_version)
    if p.committed:
        m = store.manifest_at(p.dataset, p.stage, p.version)
        return summarize(m, len(p.shards), 0, time.perf_counter() - t0, True)
    records, recomputed = [], 0
    for shard in p.shards:
        rec, fresh = run_shard(store, p, shard, cfg)
        records.append(rec)
        recomputed += int(fresh)
        if on_shard:
            on_shard(rec, fresh)
    m = commit(store, p, records, cfg.tracking.report_to)
    return summarize(m, len(p.shards), recomputed, time.perf_counter() - t0, False)


def run_bootstrap(
    store: ShardStore, cfg: PipelineConfig, source_version: str | None = None, until: str = "export"
) -> list[StageSummary]:
    """The bootstrap chain up to and including ``until``, serially, without Prefect."""
    out = []
    version = source_version
    check_chain(store, cfg, source_version)
    for name in BOOTSTRAP[: BOOTSTRAP.index(until) + 1]:
        if name == "source" and source_version:
            continue
        s = run_stage(store, name, cfg, version)
        out.append(s)
        version = s.version
    return out
