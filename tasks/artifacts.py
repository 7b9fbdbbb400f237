"""Prefect artifacts of a stage: a counts/reasons table and a markdown summary naming the version."""

from __future__ import annotations

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from stages.runner import StageSummary


def _key(text: str) -> str:
    # Artifact keys: lowercase letters, digits and dashes only.
    return "".join(c if c.isalnum() else "-" for c in text.lower())


def publish_stage_artifacts(summary: StageSummary, uri: str, title: str) -> None:
    rows = [
        {"metric": "rows in", "value": summary.rows_in},
        {"metric": "rows kept", "value": summary.rows},
        {"metric": "rows rejected", "value": summary.rejected},
        {"metric": "shards", "value": summary.shards},
        {"metric": "shards recomputed", "value": summary.recomputed},
    ] + [{"metric": f"rejected: {k}", "value": v} for k, v in summary.reasons.items()]
    create_table_artifact(
        key=_key(f"{summary.stage}-counts"),
        table=rows,
        description=f"{title}: counts and reject reasons of version {summary.version}",
    )
    reasons = "\n".join(f"| {k} | {v} |" for k, v in summary.reasons.items()) or "| (none) | 0 |"
    counts = (
        summary.rows_in,
        summary.rows,
        summary.rejected,
        summary.shards,
        summary.recomputed,
        f"{summary.seconds:.1f}",
    )
    md = f"""# {title}

**Version** `{summary.version}` at `{uri}`

| in | kept | rejected | shards | recomputed | seconds |
|---|---|---|---|---|---|
| {" | ".join(map(str, counts))} |

| reject reason | rows |
|---|---|
{reasons}
"""
    create_markdown_artifact(key=_key(f"{summary.stage}-summary"), markdown=md, description=f"{title} summary")
