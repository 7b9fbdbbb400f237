"""The ``benchmark-eval`` stage: a model on benchmark files, per-item results as a version."""

from __future__ import annotations

import json

import polars as pl

from evaluation.harness import PROTOCOLS, AnswerCache, evaluate, metrics, protocol_dict
from evaluation.readers import PAPER_COLUMNS, files_fingerprint, load_benchmarks
from stages.version import VersionPart, single_part_version
from storage import Manifest, ShardStore


def evaluated_model(
    store: ShardStore,
    cfg,
    checkpoint: str | None = None,
    endpoint: str | None = None,
    endpoint_model: str | None = None,
    concurrency: int = 8,
):
    """The model an evaluation scores and its id: an OpenAI-compatible endpoint, a defender
    version, or else the run config's own defender (``models.defender``, as Stage 2 loads it:
    on the embedded default, the warmed tiny neural defender)."""
    if endpoint:
        from evaluation.endpoint import ChatEndpoint

        client = ChatEndpoint(endpoint, endpoint_model or "default", concurrency=concurrency)
        # Everything that changes the answers: the server, the model it serves, the answer cap
        # (another server under the same model name is another model).
        ident = {"endpoint": client.url, "model": client.model, "max_tokens": client.max_tokens}
        return client, "endpoint:" + json.dumps(ident, sort_keys=True)
    if checkpoint:
        from stages.defender import defender_runtime, load_defender

        # the config's device and processor placement: a checkpoint evaluated on the card it names
        return load_defender(store, checkpoint, **defender_runtime(cfg)), f"defender:{checkpoint}"
    from stages.registry import load

    spec = cfg.model_spec("defender")
    return load("defender", spec), "defender:" + json.dumps(spec, sort_keys=True)


def evaluate_benchmarks(
    store: ShardStore,
    specs: dict[str, str],
    model,
    model_id: str,
    protocol="strict",
    cache_path: str | None = None,
    dataset: str = "benchmarks",
    images: dict[str, str] | None = None,
    prefetch: int = 1,
) -> Manifest:
    """``protocol``: "strict", "paper" or a ``Protocol`` (e.g. strict with n sampled trials);
    ``images``: a benchmark's images folder where its file names images by path (HallusionBench);
    ``prefetch``: batches whose inputs are made ahead in worker threads (evaluation.answers.ask;
    the answers, and so the version, do not depend on it)."""
    p = PROTOCOLS[protocol] if isinstance(protocol, str) else protocol
    images = images or {}
    inputs = {
        name: files_fingerprint(path)
        for name, path in {**specs, **{f"{k}:images": v for k, v in images.items()}}.items()
    }
    config = {"protocol": protocol_dict(p), "model": model_id, "benchmarks": specs, "images": images, "inputs": inputs}

    def compute(version: str) -> VersionPart:
        items, rejects = load_benchmarks(specs, images)
        rows = evaluate(
            model, model_id, items, p, AnswerCache(cache_path), label=f"evaluate {', '.join(specs)}", prefetch=prefetch
        )
        summary = metrics(rows)
        for name, m in summary.items():
            m["rejected"] = sum(r["stage"] == f"read-{name}" for r in rejects)
        df = pl.DataFrame(
            [
                {
                    **r,
                    "categories": r["categories"],
                    "responses": json.dumps(r["responses"]),
                    "parsed": json.dumps(r["parsed"]),
                    "permutation": json.dumps(r["permutation"]),
                    "meta": json.dumps(r["meta"], default=str),
                }
                for r in rows
            ]
        )
        rej = pl.DataFrame(
            rejects, schema={"id": pl.String, "stage": pl.String, "reason": pl.String, "detail": pl.String}
        )
        return VersionPart(
            df,
            len(items) + len(rejects),
            rej,
            extra={"summary": summary, "columns": [c for c in PAPER_COLUMNS if c in summary]},
        )

    return single_part_version(store, dataset, "benchmark-eval", config, [], (__name__,), compute)[0]
