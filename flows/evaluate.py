"""The ``evaluate`` flow: a defender on benchmark files and/or the synthetic robustness suite.

Publishes the summary in the paper's column order as a table artifact and a bar chart.
"""

from __future__ import annotations

import base64
import io
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.bootstrap import DEFAULT_ROOT, resolve_config
from storage import ShardStore


def _bar_chart(values: dict[str, float]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(values), 2.6))
    ax.bar(list(values), [100 * v for v in values.values()])
    ax.set_ylabel("accuracy %")
    ax.set_ylim(0, 100)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


@task(name="evaluate-benchmarks", retries=2, retry_delay_seconds=10)
def evaluate_task(
    root: str,
    storage_options: dict | None,
    benchmarks: dict[str, str],
    checkpoint: str | None,
    endpoint: str | None,
    endpoint_model: str | None,
    protocol: str,
    cache: str | None,
    synthetic_scenes: int,
    config: dict,
    prefetch: int = 1,
) -> dict:
    from config import config_from_dict
    from evaluation.readers import PAPER_COLUMNS
    from stages.benchmark import evaluate_benchmarks, evaluated_model
    from stages.robustness import robustness_suite

    store = ShardStore(root, storage_options)
    cfg = config_from_dict(config)
    model, model_id = evaluated_model(store, cfg, checkpoint, endpoint, endpoint_model)
    out: dict[str, Any] = {"model": model_id, "protocol": protocol}
    if benchmarks:
        m = evaluate_benchmarks(store, benchmarks, model, model_id, protocol, cache, prefetch=prefetch)
        out["version"] = m.version
        out["summary"] = {c: m.extra["summary"][c] for c in PAPER_COLUMNS if c in m.extra["summary"]}
    if synthetic_scenes:
        out["synthetic"] = robustness_suite(store, cfg, model, model_id, scenes=synthetic_scenes)
    return out


@flow(
    name="evaluate",
    description="A defender on V*, HRBench, POPE, HallusionBench and the synthetic suite.",
    validate_parameters=True,
)
def evaluate_flow(
    benchmarks: dict[str, str] | None = None,
    checkpoint: str | None = None,
    endpoint: str | None = None,
    endpoint_model: str | None = None,
    protocol: str = "strict",
    cache: str | None = None,
    synthetic_scenes: int = 0,
    root: str = DEFAULT_ROOT,
    preset: str = "synthetic",
    overrides: dict[str, Any] | None = None,
    storage_options: dict[str, Any] | None = None,
    prefetch: int = 1,
) -> dict:
    """``prefetch``: benchmark batches whose inputs are made ahead in worker threads, each with its
    own processor (large images on a fast card: experiments/prepare_throughput.py)."""
    cfg = resolve_config(preset, overrides)
    out = evaluate_task(
        root,
        storage_options,
        benchmarks or {},
        checkpoint,
        endpoint,
        endpoint_model,
        protocol,
        cache,
        synthetic_scenes,
        cfg.to_dict(),
        prefetch,
    )
    acc = {k: v["accuracy"] for k, v in out.get("summary", {}).items()}
    if "synthetic" in out:
        acc["synthetic clean"] = out["synthetic"]["clean_accuracy"]
        acc["synthetic attacked"] = out["synthetic"]["attacked_accuracy"]
    create_table_artifact(
        key="evaluation-summary",
        table=[{"model": out["model"], "protocol": protocol, **{k: round(100 * v, 1) for k, v in acc.items()}}],
        description="accuracy % in the paper's column order, then the synthetic suite",
    )
    if acc:
        create_markdown_artifact(
            key="evaluation-chart",
            markdown=(f"# {out['model']} ({protocol})\n\n![accuracy](data:image/png;base64,{_bar_chart(acc)})\n"),
        )
    return out
