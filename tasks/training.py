"""Prefect tasks for the defender: train (one task: resumable, cached by its version id) and evaluate."""

from __future__ import annotations

import base64

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from config import config_from_dict
from stages.defender import evaluate_defender_version, train_defender_version
from storage import ShardStore, content_hash
from tasks.shards import retry_transient


def trainer_progress(name: str, total: int, metric: str = "loss"):
    """An ``on_step`` saying a line about every tenth of a trainer's steps (the mean of ``metric``
    since the last line, and the time left) on stderr and in the Prefect run log
    (tasks/run_log.py), so a training task started from the UI shows how far it is."""
    from models.progress import StepProgress

    progress = StepProgress(name, total, metric=metric)
    return lambda row: progress(row["step"], row.get(metric))


def _train_key(context, p: dict) -> str:
    key = {k: p[k] for k in ("data_version", "init_version", "mode", "config")}
    if p.get("also_versions"):  # named only when given: the keys of runs without it stay as they were
        key["also_versions"] = list(p["also_versions"])
    return "defender-" + content_hash(key, 32)


@task(
    name="train-defender",
    task_run_name="train-defender-{mode}",
    retries=2,
    retry_delay_seconds=10,
    retry_condition_fn=retry_transient,
    cache_key_fn=_train_key,
    persist_result=True,
    result_serializer="json",
)
def train_defender_task(
    data_version: str,
    init_version: str | None,
    mode: str,
    config: dict,
    root: str,
    storage_options: dict | None = None,
    also_versions: list[str] | None = None,
) -> dict:
    from stages.defender import defender_train_config

    store, cfg = ShardStore(root, storage_options), config_from_dict(config)
    on_step = trainer_progress(f"train defender {mode}", defender_train_config(cfg, mode).steps)
    m, trained = train_defender_version(
        store, cfg, data_version, init_version, mode, on_step=on_step, also=also_versions or ()
    )
    return {"version": m.version, "trained": trained, "steps": m.extra.get("steps"), "final": m.extra.get("final", {})}


@task(name="evaluate-defender", retries=2, retry_delay_seconds=10, retry_condition_fn=retry_transient)
def evaluate_defender_task(
    checkpoint_version: str, data_version: str, config: dict, root: str, storage_options: dict | None = None
) -> dict:
    store = ShardStore(root, storage_options)
    m = evaluate_defender_version(store, config_from_dict(config), checkpoint_version, data_version)
    return {"version": m.version, **m.extra["summary"]}


def _inline_png(store: ShardStore, m, name: str) -> str:
    raw = store.read_file(m, name)
    if raw is None:
        return ""
    return f"![{name}](data:image/png;base64,{base64.b64encode(raw).decode()})"


def publish_training_artifacts(store: ShardStore, version: str) -> None:
    """The metrics table and the metrics plot (inlined PNG) of a defender or attacker version."""
    m = store.manifest(version)
    df = store.read(m)
    keep = [
        c
        for c in (
            "step",
            "loss",
            "reward",
            "accuracy",
            "aot/integrity",
            "aot/efficacy",
            "kept_group_fraction",
            "response_length",
            "entropy",
            "clip_fraction",
            "seconds",
        )
        if c in df.columns
    ]
    table = df.select(keep).to_dicts()
    role = m.stage  # defender | attacker
    create_table_artifact(key=f"{role}-metrics", table=table[-200:], description=f"per-step metrics of {version}")
    create_markdown_artifact(
        key=f"{role}-summary",
        markdown=(
            f"# {role.capitalize()} {m.extra.get('mode')} — version `{version}`\n\nParents: {', '.join(m.parents)}; "
            f"{m.extra.get('steps')} steps; at `{m.uri}`.\n\n{_inline_png(store, m, 'metrics.png')}\n"
        ),
    )


@task(
    name="train-attacker",
    task_run_name="train-attacker-{mode}",
    retries=2,
    retry_delay_seconds=10,
    retry_condition_fn=retry_transient,
    cache_key_fn=lambda c, p: (
        "attacker-"
        + content_hash({k: p[k] for k in ("data_version", "defender_version", "init_version", "mode", "config")}, 32)
    ),
    persist_result=True,
    result_serializer="json",
)
def train_attacker_task(
    data_version: str,
    defender_version: str | None,
    init_version: str | None,
    mode: str,
    config: dict,
    root: str,
    storage_options: dict | None = None,
) -> dict:
    from stages.attacker import train_attacker_version

    store, cfg = ShardStore(root, storage_options), config_from_dict(config)
    steps = (cfg.attacker.cold_start if mode == "sft" else cfg.attacker.rl).steps
    m, trained = train_attacker_version(
        store,
        cfg,
        data_version,
        defender_version,
        init_version,
        mode,
        on_step=trainer_progress(f"train attacker {mode}", steps, "loss" if mode == "sft" else "reward"),
    )
    return {"version": m.version, "trained": trained, "steps": m.extra.get("steps"), "final": m.extra.get("final", {})}


@task(name="generate-curriculum", retries=2, retry_delay_seconds=10, retry_condition_fn=retry_transient)
def generate_curriculum_task(
    attacker_version: str,
    data_version: str,
    defender_version: str,
    config: dict,
    root: str,
    storage_options: dict | None = None,
) -> dict:
    from prefect import get_run_logger

    from stages.curriculum import curriculum_progress, generate_curriculum_version

    store = ShardStore(root, storage_options)
    m = generate_curriculum_version(
        store,
        config_from_dict(config),
        attacker_version,
        data_version,
        defender_version,
        on_item=curriculum_progress(get_run_logger().info),
    )
    return {"version": m.version, **m.extra["summary"]}


def publish_curriculum_artifacts(store: ShardStore, version: str) -> None:
    """Strategy mix table, success summary, and the clean-vs-edited grid of a curriculum version."""
    m = store.manifest(version)
    s = m.extra["summary"]
    create_table_artifact(
        key="curriculum-strategies",
        table=[{"strategy": k, "share": v} for k, v in s["strategy_mix"].items()],
        description=f"strategy mix of the kept edits of {version}",
    )
    create_markdown_artifact(
        key="curriculum-summary",
        markdown=(
            f"# Curriculum `{version}`\n\n{s['kept']} of {s['items']} edits kept (integrity), "
            f"{s['clean']} clean items; "
            f"attack success rate {s['attack_success_rate']:.3f} (the same items unedited fool the defender at "
            f"{s['clean_failure_rate']:.3f}: lift {s['attack_lift']:+.3f}), mean efficacy {s['mean_efficacy']:.3f}.\n\n"
            f"Clean (top) vs edited (bottom):\n\n{_inline_png(store, m, 'grid.png')}\n\n"
            f"{_inline_png(store, m, 'strategies.png')}\n"
        ),
    )


def publish_eval_artifact(summary: dict) -> None:
    create_table_artifact(
        key="defender-evaluation",
        table=[{"metric": k, "value": v} for k, v in summary.items()],
        description="defender accuracy on clean and adversarial images",
    )


__all__ = [
    "evaluate_defender_task",
    "generate_curriculum_task",
    "publish_curriculum_artifacts",
    "publish_eval_artifact",
    "publish_training_artifacts",
    "train_attacker_task",
    "train_defender_task",
]
