"""The synthetic robustness suite: held-out synthetic scenes, clean and attacked, and the drop.

Scenes are the config's held-out world (``stages.source.heldout_config``: the world under
``source.seed + coevolution.heldout_seed_offset``, never trained on); the attack is the Stage 2
implanter (distractors that fooled the base defender), so for any other defender the
attacked set is a transfer attack. Clean and attacked accuracy are measured on the same rows.
"""

from __future__ import annotations

from config import PipelineConfig
from evaluation.harness import STRICT, AnswerCache, evaluate, metrics
from evaluation.readers import Item
from stages.runner import run_bootstrap
from stages.source import heldout_config
from storage import ShardStore, decode_image


def suite_items(store: ShardStore, export_version: str) -> list[Item]:
    items = []
    for r in store.read(export_version).iter_rows(named=True):
        for kind, col in (("clean", "clean_image"), ("attacked", "adversarial_image")):
            items.append(
                Item(
                    f"{r['id']}:{kind}",
                    f"synthetic-{kind}",
                    decode_image(r[col]),
                    r["question"],
                    r["answer"],
                    list(r["options"]),
                    [r["question_type"]],
                )
            )
    return items


def robustness_suite(
    store: ShardStore, cfg: PipelineConfig, model, model_id: str, scenes: int = 64, cache_path: str | None = None
) -> dict:
    export = run_bootstrap(store, heldout_config(cfg, scenes))[-1].version
    if not store.manifest(export).rows:
        raise ValueError(
            f"the synthetic suite has no items: Stage 2 kept no edit on {scenes} held-out scenes against "
            f"the base defender {cfg.models['defender']!r} (export version {export}); ask for more scenes"
        )
    items = suite_items(store, export)
    m = metrics(evaluate(model, model_id, items, STRICT, AnswerCache(cache_path), label="evaluate synthetic suite"))
    clean, attacked = m["synthetic-clean"]["accuracy"], m["synthetic-attacked"]["accuracy"]
    return {
        "export_version": export,
        "rows": m["synthetic-clean"]["n"],
        "clean_accuracy": clean,
        "attacked_accuracy": attacked,
        "drop": clean - attacked,
        "unparsed": (m["synthetic-clean"]["unparsed"] + m["synthetic-attacked"]["unparsed"]) / 2,
    }
