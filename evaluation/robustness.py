"""The synthetic robustness suite: held-out synthetic scenes, clean and attacked, and the drop.

Scenes come from a source seed no training run uses by default (1000); the attack is the
Stage 2 implanter (distractors that fooled the base defender), so for any other defender the
attacked set is a transfer attack. Clean and attacked accuracy are measured on the same rows.
"""

from __future__ import annotations

import dataclasses

from evaluation.harness import STRICT, AnswerCache, evaluate, metrics
from evaluation.readers import Item
from stages.config import PipelineConfig
from stages.runner import run_bootstrap
from storage import ShardStore, decode_image

HELD_OUT_SEED = 1000


def suite_items(store: ShardStore, export_version: str) -> list[Item]:
    items = []
    for r in store.read(export_version).iter_rows(named=True):
        for kind, col in (("clean", "clean_image"), ("attacked", "adversarial_image")):
            items.append(Item(f"{r['id']}:{kind}", f"synthetic-{kind}", decode_image(r[col]), r["question"], r["answer"],
                              list(r["options"]), [r["question_type"]]))
    return items


def robustness_suite(store: ShardStore, cfg: PipelineConfig, model, model_id: str, scenes: int = 64,
                     seed: int = HELD_OUT_SEED, cache_path: str | None = None) -> dict:
    held_out = dataclasses.replace(cfg, source=dataclasses.replace(cfg.source, seed=seed, num_scenes=scenes))
    export = run_bootstrap(store, held_out)[-1].version
    if not store.manifest(export).rows:
        raise ValueError(f"the synthetic suite has no items: Stage 2 kept no edit on {scenes} held-out scenes against "
                         f"the base defender {cfg.models['defender']!r} (export version {export}); ask for more scenes")
    m = metrics(evaluate(model, model_id, suite_items(store, export), STRICT, AnswerCache(cache_path)))
    clean, attacked = m["synthetic-clean"]["accuracy"], m["synthetic-attacked"]["accuracy"]
    return {"export_version": export, "rows": m["synthetic-clean"]["n"], "clean_accuracy": clean,
            "attacked_accuracy": attacked, "drop": clean - attacked,
            "unparsed": (m["synthetic-clean"]["unparsed"] + m["synthetic-attacked"]["unparsed"]) / 2}
