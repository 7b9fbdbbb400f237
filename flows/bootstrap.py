"""The bootstrap DAG: source -> extend -> filter -> implant -> export, one flow per stage.

Each stage flow takes its input version and returns its output version's summary; it is
runnable alone (``aot stage NAME --input VERSION`` or as a deployment). ``bootstrap`` chains
them as subflows. A finished version is never recomputed; a rerun after a failure recomputes
only the shards that are missing.
"""

from __future__ import annotations

import copy
import datetime
import os
import time
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner
from tqdm.auto import tqdm

from config import PipelineConfig, nest_dotted
from stages.base import BOOTSTRAP, STAGES
from stages.registry import resolve_config as checked_config
from stages.runner import commit, plan, summarize
from storage import ShardRecord, ShardStore
from tasks.artifacts import publish_stage_artifacts
from tasks.shards import process_shard, results_storage

DEFAULT_ROOT = "./aot-data"


def workers() -> int:
    """AOT_WORKERS (default 2, one per core of the project's machine kind), read when a runner is
    made, so a setting made after import still counts."""
    return int(os.environ.get("AOT_WORKERS", "2"))


def resolve_config(preset: str, overrides: dict | list | None) -> PipelineConfig:
    """Preset + overrides given as ``{"extend.canvas_scale": 1.75}`` (UI form) or ["k=v", ...] (CLI)."""
    if isinstance(overrides, dict):
        overrides = nest_dotted(overrides)
    return checked_config(preset, overrides or None)


def local_dask_cluster(spec: str):
    """A Dask cluster on this machine: ``dask`` = AOT_WORKERS worker processes; ``dask-gpus`` = one
    worker process per GPU, each seeing only its card (CUDA_VISIBLE_DEVICES), so the shards of a
    GPU stage run on all cards at once. The GPU count comes from torch, or $AOT_GPUS."""
    from distributed import LocalCluster, Nanny, Scheduler, SpecCluster

    if spec == "dask":
        return LocalCluster(n_workers=workers(), threads_per_worker=1, processes=True, dashboard_address=None)
    n = int(os.environ.get("AOT_GPUS", "0"))
    if not n:
        import torch

        n = torch.cuda.device_count()
    if n < 1:
        raise RuntimeError("task runner 'dask-gpus' found no GPU (set AOT_GPUS to force a count)")
    per_gpu = {
        f"gpu-{i}": {"cls": Nanny, "options": {"nthreads": 1, "env": {"CUDA_VISIBLE_DEVICES": str(i)}}}
        for i in range(n)
    }
    return SpecCluster(workers=per_gpu, scheduler={"cls": Scheduler, "options": {"dashboard_address": None}})


def make_task_runner(spec: str | None = None):
    """The task runner that runs a stage's shards: ``threads`` (default: AOT_WORKERS threads in
    the flow's process), ``dask`` (a local Dask cluster of worker processes), ``dask-gpus`` (one
    Dask worker per GPU), ``dask://HOST:PORT`` (an existing Dask scheduler), ``ray`` /
    ``ray://HOST:PORT`` (prefect-ray). ``$AOT_TASK_RUNNER`` sets the default for stage flows
    started on their own (deployments: set it in the work pool's env)."""
    spec = spec or os.environ.get("AOT_TASK_RUNNER", "threads")
    if spec == "threads":
        return ThreadPoolTaskRunner(max_workers=workers())
    if spec in ("dask", "dask-gpus") or spec.startswith(("dask://", "tcp://")):
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError:
            raise RuntimeError("task runner 'dask' needs prefect-dask: pip install prefect-dask") from None
        if spec in ("dask", "dask-gpus"):
            return DaskTaskRunner(cluster_class=lambda: local_dask_cluster(spec))
        return DaskTaskRunner(address=spec.replace("dask://", "tcp://"))
    if spec == "ray" or spec.startswith("ray://"):
        try:
            from prefect_ray import RayTaskRunner
        except ImportError:
            raise RuntimeError("task runner 'ray' needs prefect-ray: pip install prefect-ray") from None
        return RayTaskRunner() if spec == "ray" else RayTaskRunner(address=spec)
    raise ValueError(
        f"unknown task runner {spec!r}: use threads, dask, dask-gpus, dask://HOST:PORT, ray or ray://HOST:PORT"
    )


def run_stage(
    stage_name: str,
    input_version: str | None,
    root: str,
    preset: str,
    overrides: Any,
    storage_options: dict | None,
    refresh_cache: bool,
    progress: bool = True,
) -> dict:
    t0 = time.perf_counter()
    cfg = resolve_config(preset, overrides)
    store = ShardStore(root, storage_options)
    p = plan(store, stage_name, cfg, input_version)
    title = STAGES[stage_name].title
    logger = get_run_logger()
    if p.committed:
        m = store.manifest_at(p.dataset, p.stage, p.version)
        summary = summarize(m, len(p.shards), 0, time.perf_counter() - t0, True)
        logger.info("%s: version %s already exists; nothing to compute", stage_name, p.version)
        publish_stage_artifacts(summary, m.uri, title)
        return summary.to_dict()
    task = process_shard.with_options(result_storage=results_storage(store), refresh_cache=refresh_cache)
    plan_dict = {k: v for k, v in p.to_dict().items() if k != "shards"}
    cfg_dict = cfg.to_dict()
    futures = [task.submit(plan_dict, s.__dict__, cfg_dict, root, storage_options) for s in p.shards]
    records, recomputed, cached = [], 0, 0
    with tqdm(total=len(futures), desc=f"{stage_name:>8}", unit="shard", disable=not progress, leave=True) as bar:
        for fut in as_completed(futures):
            result = fut.result()  # raises if the shard failed after its retries
            record = ShardRecord.from_dict(result)
            hit = fut.state.name == "Cached"
            if hit and not store.record_intact(p.dataset, p.stage, p.version, record):
                # A cached result vouches for files that changed since: recompute that shard (the
                # runner sees the damage too and rewrites it), never commit what no longer verifies.
                logger.warning("%s shard %d: its cached parts no longer verify; recomputing", stage_name, record.index)
                shard = p.shards[record.index]
                result = task.with_options(refresh_cache=True)(
                    plan_dict, shard.__dict__, cfg_dict, root, storage_options
                )
                record, hit = ShardRecord.from_dict(result), False
            records.append(record)
            cached += int(hit)
            recomputed += int(result["recomputed"] and not hit)
            bar.update(1)
    m = commit(store, p, records, cfg.tracking.report_to)
    summary = summarize(m, len(p.shards), recomputed, time.perf_counter() - t0, False, cached)
    logger.info(
        "%s: version %s, %d in, %d kept, %d rejected, %d/%d shards recomputed",
        stage_name,
        m.version,
        m.rows_in,
        m.rows,
        m.reject_rows,
        recomputed,
        len(p.shards),
    )
    publish_stage_artifacts(summary, m.uri, title)
    return summary.to_dict()


def _stage_flow(stage_name: str, description: str):
    @flow(
        name=stage_name,
        description=description,
        task_runner=make_task_runner(),
        log_prints=True,
        validate_parameters=True,
    )
    def stage_flow(
        input_version: str | None = None,
        root: str = DEFAULT_ROOT,
        preset: str = "synthetic",
        overrides: dict[str, Any] | None = None,
        storage_options: dict[str, Any] | None = None,
        refresh_cache: bool = False,
        progress: bool = True,
    ) -> dict:
        return run_stage(stage_name, input_version, root, preset, overrides, storage_options, refresh_cache, progress)

    stage_flow.__name__ = f"{stage_name}_flow"
    return stage_flow


# One flow per stage, named as the stage (its deployment, config section and store folder);
# the module attribute is ``<stage>_flow`` (prefect.yaml's entrypoints).
source_flow = _stage_flow("source", "Synthetic source scenes with V*-style questions.")
extend_flow = _stage_flow("extend", "Stage 1: outpaint scenes onto larger canvases.")
filter_flow = _stage_flow("filter", "Stage 1: CLIP prefilter and judge checks.")
implant_flow = _stage_flow("implant", "Stage 2: implant effective distractors.")
export_flow = _stage_flow("export", "Export the AOT-SFT dataset.")
STAGE_FLOWS = {
    "source": source_flow,
    "extend": extend_flow,
    "filter": filter_flow,
    "implant": implant_flow,
    "export": export_flow,
}


def dated_seed(overrides: dict | None, day: datetime.date) -> dict:
    """``overrides`` with ``source.seed`` = the date as YYYYMMDD (a new world, so a new version, per day)."""
    out = copy.deepcopy(overrides or {})  # nest_dotted later writes into nested dicts: never the caller's
    out["source.seed"] = int(day.strftime("%Y%m%d"))
    return out


def _bootstrap_stages(root, preset, overrides, source_version, storage_options, refresh_cache, progress, task_runner):
    summaries, version = [], source_version
    for name in BOOTSTRAP:
        if name == "source" and source_version:
            continue
        stage_flow = (
            STAGE_FLOWS[name]
            if not task_runner
            else STAGE_FLOWS[name].with_options(task_runner=make_task_runner(task_runner))
        )
        s = stage_flow(
            input_version=version,
            root=root,
            preset=preset,
            overrides=overrides,
            storage_options=storage_options,
            refresh_cache=refresh_cache,
            progress=progress,
        )
        summaries.append(s)
        version = s["version"]
    return summaries, version


@flow(
    name="bootstrap",
    description="The AOT-SFT bootstrap: source -> extend -> filter -> implant -> export.",
    log_prints=True,
    validate_parameters=True,
)
def bootstrap(
    root: str = DEFAULT_ROOT,
    preset: str = "synthetic",
    overrides: dict[str, Any] | None = None,
    source_version: str | None = None,
    storage_options: dict[str, Any] | None = None,
    refresh_cache: bool = False,
    progress: bool = True,
    task_runner: str | None = None,
    seed_from_date: bool = False,
) -> dict:
    t0 = time.perf_counter()
    if seed_from_date:  # nightly regeneration: today's scenes are new, a same-day rerun finds them done
        overrides = dated_seed(overrides, datetime.date.today())
    cluster = None
    if task_runner in ("dask", "dask-gpus"):  # one cluster for all five stages: workers load the models once
        cluster = local_dask_cluster(task_runner)
        task_runner = cluster.scheduler_address
    try:
        summaries, version = _bootstrap_stages(
            root, preset, overrides, source_version, storage_options, refresh_cache, progress, task_runner
        )
    finally:
        if cluster is not None:
            cluster.close()
    # The parent run's own artifact: every stage's version and counts in one table.
    create_table_artifact(
        key="bootstrap-stages",
        description=f"AOT-SFT version {version}",
        table=[
            {k: s[k] for k in ("stage", "version", "rows_in", "rows", "rejected", "shards", "recomputed")}
            for s in summaries
        ],
    )
    return {"version": version, "stages": summaries, "seconds": time.perf_counter() - t0}
