"""Store maintenance as flows: ``verify`` (every version against its manifest; the nightly run can
verify before it builds on yesterday's data) and ``repair`` (rebuild a damaged version's broken
shards). Both publish what they found as a table artifact."""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.artifacts import create_table_artifact

from flows.bootstrap import DEFAULT_ROOT
from stages.maintenance import repair_version, verify_store
from storage import ShardStore


@flow(name="verify", description="Check committed versions against their manifests (sizes, sha256, checksums).")
def verify_flow(
    root: str = DEFAULT_ROOT,
    versions: list[str] | None = None,
    images: bool = False,
    storage_options: dict[str, Any] | None = None,
    fail_on_damage: bool = True,
) -> dict:
    results = verify_store(ShardStore(root, storage_options), versions, images)
    create_table_artifact(
        key="verify",
        table=[{"version": k, "problems": "; ".join(v) or "ok"} for k, v in results.items()],
        description=f"verification of {root}",
    )
    damaged = {k: v for k, v in results.items() if v}
    if damaged and fail_on_damage:
        raise RuntimeError(f"{len(damaged)} damaged versions: " + "; ".join(f"{k}: {v[0]}" for k, v in damaged.items()))
    return {"checked": len(results), "damaged": damaged}


@flow(name="repair", description="Recompute a damaged version's broken shards from its recorded inputs.")
def repair_flow(version: str, root: str = DEFAULT_ROOT, storage_options: dict[str, Any] | None = None) -> dict:
    out = repair_version(ShardStore(root, storage_options), version)
    create_table_artifact(key="repair", table=[{k: str(v) for k, v in out.items()}], description=f"repair of {version}")
    return out
