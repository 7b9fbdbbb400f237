"""Evaluate a defender on benchmark files and store the per-item results as a version."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl

from evaluation.harness import PROTOCOLS, AnswerCache, evaluate, metrics, protocol_dict
from evaluation.readers import read_hallusionbench, read_hrbench, read_pope, read_vstar
from stages.version import code_version
from storage import Manifest, ShardStore, content_hash

READERS = {
    "vstar": lambda p: read_vstar(p),
    "hrbench4k": lambda p: read_hrbench(p, "hrbench4k"),
    "hrbench8k": lambda p: read_hrbench(p, "hrbench8k"),
    "pope": lambda p: read_pope(p),
    "hallusionbench": lambda p: read_hallusionbench(p),
}
# The paper's column order for the summary (METHOD.md, "Published results").
PAPER_COLUMNS = ["vstar", "hrbench4k", "hrbench8k", "hallusionbench", "pope"]


def evaluated_model(store: ShardStore, cfg, checkpoint: str | None = None, endpoint: str | None = None,
                    endpoint_model: str | None = None, concurrency: int = 8):
    """The model an evaluation scores and its id: an OpenAI-compatible endpoint, a defender
    version, or else the run config's own defender (``models.defender``, as Stage 2 loads it:
    on the embedded default, the warmed tiny neural defender)."""
    if endpoint:
        from evaluation.endpoint import ChatEndpoint

        return ChatEndpoint(endpoint, endpoint_model or "default", concurrency=concurrency), f"endpoint:{endpoint_model}"
    if checkpoint:
        from training.stage import load_defender

        return load_defender(store, checkpoint), f"defender:{checkpoint}"
    from models import load

    spec = cfg.model_spec("defender")
    return load("defender", spec), "defender:" + json.dumps(spec, sort_keys=True)


def files_fingerprint(path: str | Path) -> str:
    """Identity of a benchmark's files: every file's relative path, size and modification time
    (an edited file, even with as many rows, is a new input; no need to hash gigabytes)."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return content_hash([[str(f.relative_to(path.parent)), f.stat().st_size, f.stat().st_mtime_ns] for f in files])


def load_benchmarks(specs: dict[str, str]):
    items, rejects = [], []
    for name, path in specs.items():
        if name not in READERS:
            raise ValueError(f"unknown benchmark {name!r}; choose from {', '.join(READERS)}")
        it, rej = READERS[name](path)
        items += it
        rejects += [{"id": r.id, "stage": f"read-{name}", "reason": r.reason, "detail": r.detail} for r in rej]
    return items, rejects


def evaluate_benchmarks(store: ShardStore, specs: dict[str, str], model, model_id: str, protocol="strict",
                        cache_path: str | None = None, dataset: str = "benchmarks") -> Manifest:
    """``protocol``: "strict", "paper" or a ``Protocol`` (e.g. strict with n sampled trials)."""
    p = PROTOCOLS[protocol] if isinstance(protocol, str) else protocol
    items, rejects = load_benchmarks(specs)
    inputs = {name: files_fingerprint(path) for name, path in specs.items()}
    version = content_hash({"stage": "benchmark-eval", "model": model_id, "protocol": protocol_dict(p),
                            "inputs": inputs, "code": code_version()})
    done = store.manifest_at(dataset, "benchmark-eval", version)
    if done is not None:
        return done
    rows = evaluate(model, model_id, items, p, AnswerCache(cache_path))
    summary = metrics(rows)
    df = pl.DataFrame([{**r, "categories": r["categories"], "responses": json.dumps(r["responses"]),
                        "parsed": json.dumps(r["parsed"]), "permutation": json.dumps(r["permutation"]),
                        "meta": json.dumps(r["meta"], default=str)} for r in rows])
    rej = pl.DataFrame(rejects, schema={"id": pl.String, "stage": pl.String, "reason": pl.String, "detail": pl.String})
    rec = store.write_shard(dataset, "benchmark-eval", version, 0, version, len(items) + len(rejects), df, rej)
    return store.commit(dataset, "benchmark-eval", version, [rec], config={"protocol": protocol_dict(p), "model": model_id,
                        "benchmarks": specs}, parents=[], code_version=code_version(),
                        extra={"summary": summary, "columns": [c for c in PAPER_COLUMNS if c in summary]})
