"""The attacker as a stage of the DAG: train it (cold start / Flow-GRPO), load it.

An attacker version lives at ``ROOT/<dataset>/attacker/<version>/``: the LoRA
(``lora.safetensors``) and trainer state, ``part-00000.parquet`` (metrics, one row per step),
``samples.parquet`` (every reward component of every sampled edit), ``metrics.png``, and a
manifest whose parents are the dataset version, the frozen defender (Flow-GRPO) and the
starting attacker (if any). The base editor is named by the config's model spec, so a version
is its LoRA. While training, checkpoints go to ``_work/latest``; a rerun resumes there.

"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from typing import Callable

import numpy as np
import polars as pl
from PIL import Image

from config import PipelineConfig
from models.editor import attack_instruction
from models.mcq import format_prompt
from stages.checkpoints import fetch_version, resume_folder, train_resumably, trained_part
from stages.defender import defender_runtime, load_defender
from stages.version import VersionPart, kernel_family, single_part_version
from storage import Manifest, ShardStore, content_hash, decode_image
from training.attacker import AttackerTrainer, EditPair, Placement
from training.attacker_rewards import AttackItem, IntegrityEfficacy


def items_from_version(
    store: ShardStore, manifest: Manifest, max_items: int = 0, shapes: bool = False
) -> list[AttackItem]:
    """Attackable items of any dataset version: (clean image, question, answer, target boxes);
    ``shapes``: each with its targets' mask (``item_from_row``)."""
    df = store.read(manifest)
    if max_items:
        df = df.head(max_items)
    col = "clean_image" if "clean_image" in df.columns else "image"
    missing = [c for c in ("question", "options", "answer", "target_boxes") if c not in df.columns]
    if missing:
        raise ValueError(
            f"version {manifest.version} ({manifest.stage}) has no {missing} columns: give a source, "
            "extend, filter, implant or export version"
        )
    return [item_from_row(row, col, shapes) for row in df.iter_rows(named=True)]


def target_mask(row: dict, size: tuple[int, int]) -> Image.Image:
    """'L' mask (255 = keep) at ``size`` of the row's targets' own pixels: each target box matched to
    the scene object drawn there (``world.object_mask``, the pixels ``render`` paints); a box that no
    object of the row's scene fills, or a row without a scene, keeps the whole box."""
    from world import Scene, object_mask

    boxes = [[int(round(v)) for v in b] for b in row["target_boxes"]]
    scene = Scene.from_dict(json.loads(row["scene"])) if row.get("scene") else None
    mask = np.zeros((size[1], size[0]), dtype=bool)
    if scene is not None and tuple(scene.size) == tuple(size):
        by_box = {tuple(int(round(v)) for v in scene.image_box(o)): o for o in scene.visible(1e-9)}
        found = [by_box[tuple(b)] for b in boxes if tuple(b) in by_box]
        mask |= object_mask(scene, found)
        boxes = [b for b in boxes if tuple(b) not in by_box]
    for x0, y0, x1, y1 in boxes:
        mask[max(0, y0) : max(0, y1), max(0, x0) : max(0, x1)] = True
    return Image.fromarray(mask.astype(np.uint8) * 255)  # 2-D uint8: an 'L' image


def item_from_row(row: dict, col: str = "image", shapes: bool = False) -> AttackItem:
    """One dataset row (its ``col`` image) as an item to attack, with the attacker's instruction;
    ``shapes`` (``attacker.keep_target_shapes``): with the mask of its targets' own pixels."""
    names = row.get("target_names") or []
    image = decode_image(row[col])
    return AttackItem(
        row["id"],
        image,
        attack_instruction(row["question"], names),
        row["target_boxes"],
        format_prompt(row["question"], row["options"]),
        row["answer"],
        len(row["options"]),
        names,
        row["question"],
        row["options"],
        target_mask(row, image.size) if shapes else None,
    )


def pairs_from_version(store: ShardStore, manifest: Manifest, max_items: int = 0, named: float = 1.0) -> list[EditPair]:
    """Cold-start pairs of an AOT-SFT (export) or attack version: clean -> adversarial. A share
    ``named`` of the instructions (chosen by row id, so the same rows whatever the order) name the
    distractor; the rest are the instruction of a fresh item, which names none."""
    df = store.read(manifest)
    if "adversarial_image" not in df.columns:
        raise ValueError(
            f"version {manifest.version} is a {manifest.stage} version; the cold start needs an AOT-SFT "
            "(export) or attack version with clean/adversarial pairs"
        )
    if max_items:
        df = df.head(max_items)

    def names_it(row_id: str) -> bool:
        return int(content_hash({"id": row_id, "named": "cold-start"}, 8), 16) / 16**8 < named

    def description(row: dict) -> str | None:  # export rows list it; attack rows keep it in their meta
        found = row.get("distractor_descriptions") or json.loads(row.get("meta") or "{}").get("distractors") or [None]
        return found[0] if names_it(row["id"]) else None

    return [
        EditPair(
            decode_image(r["clean_image"]),
            decode_image(r["adversarial_image"]),
            attack_instruction(r["question"], r["target_names"] or [], description(r)),
        )
        for r in df.iter_rows(named=True)
    ]


def load_attacker(store: ShardStore, version: str | None, model_spec: dict):
    """The editor of ``model_spec`` with an attacker version's LoRA (or none, for a fresh start)."""
    from models.editor import load_editor

    editor = load_editor(model_spec)
    if version:
        m = store.manifest(version)
        if m.stage != "attacker":
            raise ValueError(f"{version} is a {m.stage} version, not an attacker checkpoint")
        if m.config["attacker"]["model"] != model_spec:
            raise ValueError(
                f"attacker {version} was trained on {m.config['attacker']['model']}, not {model_spec}: "
                "set attacker.model to match"
            )
        state = m.extra["lora"]
        editor.add_lora(state["rank"], state["alpha"], seed=0)
        editor.load_lora(fetch_version(store, m))
    return editor


def _samples_frame(samples: list[dict]) -> pl.DataFrame:
    """Per-sample reward components; only scalar columns (None where a component is absent)."""
    keys = sorted({k for s in samples for k, v in s.items() if isinstance(v, (int, float, str, bool)) or v is None})
    return (
        pl.DataFrame([{k: s.get(k) for k in keys} for s in samples], infer_schema_length=None)
        if samples
        else pl.DataFrame({"step": []})
    )


MODULES = (__name__,)  # the code of an attacker version: this module and what it imports


def frozen_reward(
    store: ShardStore, cfg: PipelineConfig, defender_version: str, efficacy: str | None = None
) -> IntegrityEfficacy:
    """Integrity x efficacy against a frozen defender version (``attacker.rl.reward``);
    ``efficacy`` overrides the config's kind (curricula score with the paper's sampled one)."""
    r = cfg.attacker.rl.reward
    defender = load_defender(store, defender_version, **defender_runtime(cfg))
    return IntegrityEfficacy(
        defender,
        r.tau,
        r.queries,
        r.temperature,
        r.global_floor,
        r.invalid_penalty,
        efficacy or r.efficacy,
        r.invalid_score,
        r.integrity_target,
        r.dual_lr,
    )


def train_attacker_version(
    store: ShardStore,
    cfg: PipelineConfig,
    data_version: str,
    defender_version: str | None = None,
    init_version: str | None = None,
    mode: str = "sft",
    on_step: Callable[[dict], None] | None = None,
) -> tuple[Manifest, bool]:
    """Train (or find) the attacker version for these inputs. Returns (manifest, trained_now)."""
    a = cfg.attacker
    train_cfg = a.cold_start if mode == "sft" else a.rl
    if mode == "grpo" and not defender_version:
        raise ValueError("Flow-GRPO trains against a frozen defender: give --defender VERSION")
    data = store.manifest(data_version)
    parents = [data.version] + ([defender_version] if mode == "grpo" else []) + ([init_version] if init_version else [])
    vcfg = {
        "attacker": {"model": a.model, "max_items": a.max_items, "mode": mode, "train": dataclasses.asdict(train_cfg)}
    }
    if mode == "sft" and a.cold_start_named != 1.0:  # (1.0: the ids versions had before the option)
        vcfg["attacker"]["named"] = a.cold_start_named
    if mode == "grpo":  # the cold start never edits through it: one cold start serves both settings
        vcfg["attacker"]["keep_targets"] = a.keep_targets
        if a.keep_target_shapes:  # (off: the ids versions had before the option)
            vcfg["attacker"]["keep_target_shapes"] = True
        if a.edits_at_source_size:  # (off: the ids versions had before the option)
            vcfg["attacker"]["edits_at_source_size"] = True
        if a.change_from_reconstruction:  # (off: the ids versions had before the option)
            vcfg["attacker"]["change_from_reconstruction"] = True
        if a.change_floor:  # (0: the ids versions had before the option)
            vcfg["attacker"]["change_floor"] = a.change_floor

    def compute(version: str) -> VersionPart:
        editor = load_attacker(store, init_version, a.model)
        lora = (
            store.manifest(init_version).extra["lora"]
            if init_version
            else {"rank": train_cfg.lora_rank, "alpha": train_cfg.lora_alpha}
        )
        if mode == "sft":
            kw = {"pairs": pairs_from_version(store, data, a.max_items, a.cold_start_named)}
        else:
            kw = {
                "items": items_from_version(store, data, a.max_items, a.keep_target_shapes),
                "rewards": {"aot": frozen_reward(store, cfg, defender_version)},
            }
        with tempfile.TemporaryDirectory() as tmp:
            resume = resume_folder(store, data.dataset, "attacker", version, tmp)
            trainer = AttackerTrainer(
                editor,
                train_cfg,
                resume_from=resume,
                placement=Placement.of(a),
                **kw,
            )
            train_resumably(
                trainer,
                store,
                data.dataset,
                "attacker",
                version,
                tmp,
                train_cfg.steps,
                train_cfg.checkpoint_every,
                on_step,
                cfg.tracking.report_to,
                vcfg,
                parents,
            )
            plot = ["loss"] if mode == "sft" else ["reward", "aot/integrity", "aot/efficacy", "clip_fraction"]
            return trained_part(
                trainer,
                store,
                data.dataset,
                "attacker",
                version,
                tmp,
                plot,
                len(kw.get("pairs") or kw["items"]),
                {"mode": mode, "lora": lora},
                lambda final: _samples_frame(trainer.samples).write_parquet(os.path.join(final, "samples.parquet")),
            )

    devices = [a.model.get("device", "cpu"), cfg.defender.model.get("device", "cpu")]
    return single_part_version(store, data.dataset, "attacker", vcfg, parents, MODULES, compute, kernel_family(devices))
