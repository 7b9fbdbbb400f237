"""The curriculum stage: the frozen attacker edits fresh items, scored by a frozen defender.

A curriculum version (stage ``curriculum``) holds one row per image: the frozen attacker's
edits of fresh items that passed integrity (with efficacy, SSIM and strategy recorded) mixed
with clean items at ``clean_fraction``; the defender stage trains on it like any dataset version.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from typing import Callable

import polars as pl
import torch

from config import PipelineConfig
from stages.attacker import frozen_reward, items_from_version, load_attacker
from stages.rows import ITEM_REJECTS, frame
from stages.version import code_version, kernel_family, version_id
from storage import IMAGE_DTYPE, Manifest, ShardStore, content_hash, decode_image, image_cells
from training.attacker import Placement, at_edit_size, place_edit, reconstructions, scored_item
from training.attacker_rewards import AttackItem

MODULES = (__name__,)
# reward fields only attacker training reads: the curriculum scores with the paper's sampled E
TRAINING_ONLY = ("efficacy", "invalid_score", "integrity_target", "dual_lr")


@torch.no_grad()
def edit_items(
    editor,
    items: list[AttackItem],
    seeds: list[int],
    steps: int,
    batch: int = 1,
    on_item: Callable[[int, int], None] | None = None,
    noise_level: float = 0.0,
    sigma_cap: float = 0.0,
    first: int = 0,
    placement: Placement = Placement(),
) -> list:
    """The frozen attacker's edit of every item: the deterministic ODE sampler, up to ``batch``
    items of one edit size per sampler call; with ``noise_level`` > 0 the SDE sampler, one item per
    call. Item i's noise (initial, and each SDE step's) is seeded by ``seeds[i]`` alone, and a
    sampler call never spans a multiple of ``batch`` in the item's position ``first + i``: a shard
    of a run (``first`` its first item) makes the calls the whole run would, so its edits are
    bit-identical to the unsharded run's (batched matrix products round differently per batch).
    ``placement`` (``training.attacker.Placement``): the targets given back, each edit applied to its
    item at the item's own size or returned at the editor's, its change taken against the editor's
    reconstruction, small changes dropped — as the attacker config says.
    """
    from rl.flow_sampler import sample

    if noise_level > 0:
        batch = 1  # the SDE steps draw from one generator per call: one item each keeps them per item
    seen = [at_edit_size(editor, it) for it in items]
    out, i = [], 0
    while i < len(items):
        j = i + 1
        while j < len(items) and (first + j) % batch and seen[j].image.size == seen[i].image.size:
            j += 1
        chunk = seen[i:j]
        cond = editor.condition([it.image for it in chunk], [it.instruction for it in chunk])
        gens = [torch.Generator().manual_seed(seeds[i + k]) for k in range(len(chunk))]
        x = torch.cat([editor.noise(cond.select(k), g) for k, g in enumerate(gens)])
        edits = editor.decode(
            sample(editor, cond, steps, noise_level, sigma_cap=sigma_cap, generator=gens[0], x=x).final, cond
        )
        refs = reconstructions(editor, cond) if placement.from_reconstruction else [None] * len(chunk)
        out += [  # scored against the item itself, or the editor-size copy it was edited from
            place_edit(it if placement.at_source_size else s, s.image, e, placement, ref)
            for it, s, e, ref in zip(items[i:j], chunk, edits, refs)
        ]
        i = j
        if on_item:
            on_item(i, len(items))
    return out


CURRICULUM = {
    "id": pl.String,
    "kind": pl.String,  # clean | adversarial
    "image": IMAGE_DTYPE,
    "question": pl.String,
    "options": pl.List(pl.String),
    "answer": pl.String,
    "target_names": pl.List(pl.String),
    "target_boxes": pl.List(pl.List(pl.Float64)),
    "integrity": pl.Float64,
    "target_ssim_min": pl.Float64,
    "efficacy": pl.Float64,
    "clean_efficacy": pl.Float64,  # the same defender and queries on the unedited image
    "consecutive_failures": pl.Int64,
    "strategy": pl.String,
    "changed_fraction": pl.Float64,
    "moved_fraction": pl.Float64,  # pixels moved by more than 16 levels (metrics.strategies.classify_edit)
    "description": pl.String,  # the judge's words, when attacker.curriculum.describe is on
}


@torch.no_grad()
def generate_curriculum_version(
    store: ShardStore,
    cfg: PipelineConfig,
    attacker_version: str,
    data_version: str,
    defender_version: str,
    on_item: Callable[[int, int], None] | None = None,
) -> Manifest:
    """The frozen attacker edits every item of ``data_version`` once (ODE sampler, one seed per
    item); edits that pass integrity are kept with their efficacy against the frozen defender and
    their strategy, then mixed with clean items (``clean_fraction`` of the rows, and at least up to
    ``min_rows`` rows). Rows that fail integrity go to the rejects.

    The edits run in shards of ``attacker.curriculum.shard_size`` items, each written as it
    finishes: a crashed or retried run redoes only the shards that did not finish. The clean
    fill, which depends on every shard's kept edits, is the last shard."""
    from metrics.strategies import strategy_mix

    a, c = cfg.attacker, cfg.attacker.curriculum
    data = store.manifest(data_version)
    parents = [attacker_version, data.version, defender_version]
    vcfg = {
        "curriculum": dataclasses.asdict(c),
        # what scores the curriculum (not the TRAINING_ONLY fields)
        "reward": {k: v for k, v in dataclasses.asdict(a.rl.reward).items() if k not in TRAINING_ONLY},
        "model": a.model,
        "keep_targets": a.keep_targets,
        **({"keep_target_shapes": True} if a.keep_target_shapes else {}),  # (off: the ids before the option)
        **({"edits_at_source_size": True} if a.edits_at_source_size else {}),  # (off: the ids before the option)
        **({"change_from_reconstruction": True} if a.change_from_reconstruction else {}),  # (likewise)
        **({"change_floor": a.change_floor} if a.change_floor else {}),  # (likewise)
        **({"judge": cfg.models["judge"]} if c.describe else {}),
    }
    code = code_version(MODULES)
    kernels = kernel_family([a.model.get("device", "cpu"), cfg.defender.model.get("device", "cpu")])
    version = version_id("curriculum", vcfg, parents, code, kernels)
    done = store.manifest_at(data.dataset, "curriculum", version)
    if done is not None:
        return done
    items = items_from_version(store, data, c.max_items, a.keep_target_shapes)
    size = c.shard_size or max(1, len(items))
    chunks = [range(i, min(i + size, len(items))) for i in range(0, len(items), size)]
    models: dict = {}  # editor, defender and reward: loaded on the first shard that needs computing
    records, kept = [], []
    for index, chunk in enumerate(chunks):
        key = content_hash({"parents": parents, "items": [items[n].id for n in chunk]})
        rec = store.finished_shard(data.dataset, "curriculum", version, index, key)
        if rec is None:
            df, rej = _curriculum_shard(store, cfg, attacker_version, defender_version, items, chunk, models, on_item)
            rec = store.write_shard(data.dataset, "curriculum", version, index, key, len(chunk), df, rej)
        elif on_item:
            on_item(chunk.stop, len(items))
        records.append(rec)
        kept += store.read_version_part(data.dataset, "curriculum", version, rec.data).to_dicts()
    # Clean items: the attacked items' own clean images first, then the rest, up to the fraction.
    n_clean = max(round(len(kept) * c.clean_fraction / (1 - c.clean_fraction)), c.min_rows - len(kept))
    attacked = {k["id"] for k in kept}
    order = sorted(range(len(items)), key=lambda i: (f"{items[i].id}:attack" not in attacked, i))
    # at the size of the adversarial rows (a size that told them apart would be a shortcut)
    editor = models.get("editor") or load_attacker(store, attacker_version, a.model)
    clean = [scored_item(editor, items[i], a.edits_at_source_size) for i in order[:n_clean]]
    rows = [
        {
            "id": f"{it.id}:clean",
            "kind": "clean",
            "question": it.question,
            "options": it.options,
            "answer": it.answer,
            "target_names": it.target_names,
            "target_boxes": it.target_boxes,
        }
        for it in clean
    ]
    for row, cell in zip(rows, image_cells([it.image for it in clean])):
        row["image"] = cell
    records.append(
        store.write_shard(
            data.dataset,
            "curriculum",
            version,
            len(chunks),
            content_hash(sorted(attacked)),
            0,
            frame(rows, CURRICULUM),
            frame([], ITEM_REJECTS),
        )
    )
    mix = strategy_mix([k["strategy"] for k in kept])
    by_id = {it.id: it for it in items}
    edits = [(by_id[k["id"].removesuffix(":attack")].image, decode_image(k["image"])) for k in kept[:8]]
    with tempfile.TemporaryDirectory() as tmp:
        edit_grid(edits, os.path.join(tmp, "grid.png"))
        plot_strategy_mix(mix, os.path.join(tmp, "strategies.png"))
        files = store.put_folder(data.dataset, "curriculum", version, tmp)
    summary = {
        "items": len(items),
        "kept": len(kept),
        "clean": len(clean),
        "shards": len(chunks),
        **attack_summary(kept, len(items)),
        "strategy_mix": mix,
        # how much of the scene the kept edits move (> 16 levels): what a defender trained on them sees
        "moved_fraction": sum(k["moved_fraction"] for k in kept) / max(1, len(kept)),
    }
    return store.commit(
        data.dataset,
        "curriculum",
        version,
        records,
        config=vcfg,
        parents=parents,
        code_version=code,
        files=files,
        extra={"summary": summary, "kernels": kernels},
    )


def curriculum_progress(emit: Callable[[str], None]) -> Callable[[int, int], None]:
    """An ``on_item`` for generate_curriculum_version that says how far the edits are, about every
    tenth of the items (each sampler batch reports; finished shards of a resumed run count at once)."""
    said = [-1]

    def on_item(done: int, total: int) -> None:
        tenth = 10 * done // max(1, total)
        if tenth > said[0]:
            said[0] = tenth
            emit(f"curriculum: {done}/{total} items edited")

    return on_item


def _curriculum_shard(
    store: ShardStore,
    cfg: PipelineConfig,
    attacker_version: str,
    defender_version: str,
    items: list[AttackItem],
    chunk: range,
    models: dict,
    on_item: Callable[[int, int], None] | None,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Edit, gate, score and label one shard's items: (kept adversarial rows, integrity rejects)."""
    from metrics.strategies import classify_edit

    a, c, r = cfg.attacker, cfg.attacker.curriculum, cfg.attacker.rl.reward
    if not models:
        models["editor"] = load_attacker(store, attacker_version, a.model)
        models["reward"] = frozen_reward(store, cfg, defender_version, "sampled")  # success as held-out scores read it
    editor, reward = models["editor"], models["reward"]
    shard = [scored_item(editor, items[n], a.edits_at_source_size) for n in chunk]
    progress = (lambda i, n: on_item(chunk.start + i, len(items))) if on_item else None
    outputs = edit_items(
        editor,
        shard,
        [c.seed * 1_000_003 + n for n in chunk],
        c.sampling_steps,
        c.batch,
        progress,
        c.noise_level,
        a.rl.flow_grpo.sigma_cap,
        first=chunk.start,
        placement=Placement.of(a),
    )
    kept, kept_items, rejects, edits = [], [], [], []
    # Scored c.batch at a time: each image's sampled answers are its own (IntegrityEfficacy.answers).
    scores = _in_batches(c.batch, lambda s: reward([it.image for it in shard[s]], outputs[s], shard[s]), len(shard))
    for item, edited, score in zip(shard, outputs, scores):
        strat = classify_edit(item.image, edited)
        row = {
            "id": f"{item.id}:attack",
            "kind": "adversarial",
            "question": item.question,
            "options": item.options,
            "answer": item.answer,
            "target_names": item.target_names,
            "target_boxes": item.target_boxes,
            "integrity": score["integrity"],
            "target_ssim_min": score["target_ssim_min"],
            "efficacy": score["efficacy"],
            "consecutive_failures": score["consecutive_failures"],
            "strategy": strat["strategy"],
            "changed_fraction": strat["changed_fraction"],
            "moved_fraction": strat["moved_fraction"],
        }
        if score["integrity"]:
            kept.append(row)
            kept_items.append(item)
            edits.append((item.image, edited))
        else:
            rejects.append(
                {
                    "id": item.id,
                    "reason": "integrity",
                    "detail": f"target SSIM {score['target_ssim_min']:.3f} < tau {r.tau}",
                }
            )
    # The defender on the kept items' clean images: an edit that "fools" it on an item it already
    # fails is no attack, so the summary reads success against this baseline (attack_lift).
    clean = _in_batches(
        c.batch, lambda s: reward.unedited_efficacy([it.image for it in kept_items[s]], kept_items[s]), len(kept_items)
    )
    for row, e in zip(kept, clean):
        row["clean_efficacy"] = e
    if c.describe and kept:  # a real judge's description of each kept edit refines its label
        from metrics.strategies import refine_with_description
        from stages.registry import load

        judge = load("judge", cfg.models["judge"])
        if not hasattr(judge, "describe_edits"):
            raise ValueError(
                f"attacker.curriculum.describe needs an MLLM judge (models.judge: mllm or tiny), "
                f"not {cfg.models['judge']!r}"
            )
        for row, text in zip(kept, judge.describe_edits(edits)):
            row["description"] = text
            row["strategy"] = refine_with_description(row["strategy"], text)
    for row, cell in zip(kept, image_cells([e for _, e in edits])):
        row["image"] = cell
    return frame(kept, CURRICULUM), frame(rejects, ITEM_REJECTS)


def _in_batches(size: int, score: Callable[[slice], list], n: int) -> list:
    """``score`` over slices of ``size`` of n rows, concatenated: one defender call per batch."""
    return [r for i in range(0, n, size) for r in score(slice(i, min(n, i + size)))]


def attack_summary(kept: list[dict], items: int) -> dict:
    """Rates over all ``items`` attacked, from the kept rows' ``efficacy`` and ``clean_efficacy``:
    success = kept edits that fool the defender at least once in K; clean failure = the same
    items' unedited images that do; lift = success - clean failure (what the edits add); flips =
    kept items answered right at the first query when clean and wrong when edited."""
    n = max(1, items)
    eff = [k["efficacy"] for k in kept]
    return {
        "integrity_rate": len(kept) / n,
        "attack_success_rate": sum(e > 0 for e in eff) / n,
        "clean_failure_rate": sum(k["clean_efficacy"] > 0 for k in kept) / n,
        "attack_lift": (sum(e > 0 for e in eff) - sum(k["clean_efficacy"] > 0 for k in kept)) / n,
        "flip_rate": sum(k["clean_efficacy"] == 0 and k["efficacy"] > 0 for k in kept) / n,
        "mean_efficacy": sum(eff) / max(1, len(eff)),
    }


def edit_grid(pairs: list[tuple], path: str) -> None:
    """Clean (top row) over edited (bottom row): the run's image-grid artifact."""
    from PIL import Image

    if not pairs:
        return
    w = max(c.width for c, _ in pairs)
    h = max(c.height for c, _ in pairs)
    grid = Image.new("RGB", (w * len(pairs), h * 2), "white")
    for i, (clean, edited) in enumerate(pairs):
        grid.paste(clean.convert("RGB"), (i * w, 0))
        grid.paste(edited.convert("RGB").resize(clean.size), (i * w, h))
    grid.save(path)


def plot_strategy_mix(mix: dict[str, float], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.2, 2.4))
    ax.bar(list(mix), list(mix.values()))
    ax.set_ylabel("share of kept edits")
    ax.set_ylim(0, 1)
    ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
