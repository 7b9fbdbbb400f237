"""Prefect tasks for the defender: train (one task: resumable, cached by its version id) and evaluate."""

from __future__ import annotations

import base64

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from stages.config import config_from_dict
from storage import ShardStore, content_hash
from tasks.shards import retry_transient
from training.stage import evaluate_defender_version, train_defender_version


def _train_key(context, p: dict) -> str:
    return "defender-" + content_hash({k: p[k] for k in ("data_version", "init_version", "mode", "config")}, 32)


@task(name="train-defender", task_run_name="train-defender-{mode}", retries=2, retry_delay_seconds=10,
      retry_condition_fn=retry_transient, cache_key_fn=_train_key, persist_result=True, result_serializer="json")
def train_defender_task(data_version: str, init_version: str | None, mode: str, config: dict, root: str,
                        storage_options: dict | None = None) -> dict:
    store = ShardStore(root, storage_options)
    m, trained = train_defender_version(store, config_from_dict(config), data_version, init_version, mode)
    return {"version": m.version, "trained": trained, "steps": m.extra.get("steps"), "final": m.extra.get("final", {})}


@task(name="evaluate-defender", retries=2, retry_delay_seconds=10, retry_condition_fn=retry_transient)
def evaluate_defender_task(checkpoint_version: str, data_version: str, config: dict, root: str,
                           storage_options: dict | None = None) -> dict:
    store = ShardStore(root, storage_options)
    m = evaluate_defender_version(store, config_from_dict(config), checkpoint_version, data_version)
    return {"version": m.version, **m.extra["summary"]}


def publish_training_artifacts(store: ShardStore, version: str) -> None:
    """The metrics table and the metrics plot (inlined PNG) of a defender version."""
    m = store.manifest(version)
    df = store.read(m)
    keep = [c for c in ("step", "loss", "reward", "accuracy", "kept_group_fraction", "response_length", "entropy",
                        "clip_fraction", "seconds") if c in df.columns]
    table = df.select(keep).to_dicts()
    create_table_artifact(key="defender-metrics", table=table[-200:], description=f"per-step metrics of {version}")
    plot = next((f for f in m.files if f.path == "metrics.png"), None)
    img = ""
    if plot is not None:
        raw = store.fs.cat_file(store.part_path(m, plot))
        img = f"![metrics](data:image/png;base64,{base64.b64encode(raw).decode()})"
    create_markdown_artifact(key="defender-summary", markdown=(
        f"# Defender {m.extra.get('mode')} — version `{version}`\n\nParents: {', '.join(m.parents)}; "
        f"{m.extra.get('steps')} steps on {m.extra.get('examples')} examples; at `{m.uri}`.\n\n{img}\n"))


def publish_eval_artifact(summary: dict) -> None:
    create_table_artifact(key="defender-evaluation", table=[{"metric": k, "value": v} for k, v in summary.items()],
                          description="defender accuracy on clean and adversarial images")


__all__ = ["evaluate_defender_task", "publish_eval_artifact", "publish_training_artifacts", "train_defender_task"]
