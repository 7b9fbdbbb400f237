"""The defender as a stage of the DAG: train on a dataset version, evaluate on one, load one.

A defender version lives at ``ROOT/<dataset>/defender/<version>/``: the checkpoint (model
safetensors, processor, trainer state), ``part-00000.parquet`` (the metrics, one row per step),
``metrics.png`` and a manifest whose parents are the dataset version and the starting
checkpoint (if any). Its id hashes the training config, the model spec, the code and the
parents. A crashed run resumes from its last checkpoint (stages/checkpoints.py).
"""

from __future__ import annotations

import dataclasses
import tempfile
from typing import Callable, Sequence

import polars as pl

from config import ConfigError, PipelineConfig
from evaluation.answers import answer_items
from models.mcq import format_prompt
from models.text_attention import DEFAULT as DEFAULT_TEXT_ATTENTION
from models.vision_attention import DEFAULT as DEFAULT_VISION_ATTENTION
from stages.checkpoints import fetch_version, resume_folder, train_resumably, trained_part
from stages.version import VersionPart, kernel_family, single_part_version
from storage import Manifest, ShardStore, decode_image
from training.defender import DefenderTrainer, Example
from training.distributed import barrier, is_main


def examples_from_version(store: ShardStore, manifest: Manifest, images: str = "both", max_examples: int = 0):
    """Training/evaluation examples of a dataset version: (image, MCQ prompt, answer letter).

    AOT-SFT versions give their clean and/or adversarial image per row (``images``); every
    other stage's rows give their ``image``.
    """
    df = store.read(manifest)
    if max_examples:
        df = df.head(max_examples)
    if "clean_image" in df.columns:
        cols = {
            "clean": ["clean_image"],
            "adversarial": ["adversarial_image"],
            "both": ["clean_image", "adversarial_image"],
        }[images]
    else:
        cols = ["image"]
    out = []
    for row in df.iter_rows(named=True):
        prompt = format_prompt(row["question"], row["options"])
        for col in cols:
            # a curriculum row says what it is; other single-image rows are clean scenes
            kind = col.removesuffix("_image") if col != "image" else row.get("kind") or "clean"
            out.append(
                Example(f"{row['id']}:{kind}", decode_image(row[col]), prompt, row["answer"], len(row["options"]))
            )
    return out


MODES = ("sft", "dapo", "warmup")


def defender_train_config(cfg: PipelineConfig, mode: str):
    """The training settings of a defender stage run: ``sft`` — ``defender.warmup`` in SFT mode;
    ``dapo`` — ``defender.rl``; ``warmup`` — ``defender.warmup`` in its own mode (defender 0 of
    the co-evolution: supervised for the tiny defender, which starts from random weights; a DAPO
    stage on clean data for a pretrained one, as AOT's warm-up, METHOD.md)."""
    if mode not in MODES:
        raise ValueError(f"defender training mode must be one of {MODES}, not {mode!r}")
    d = cfg.defender
    if mode == "warmup":
        return d.warmup
    return dataclasses.replace(d.warmup if mode == "sft" else d.rl, mode=mode)


def defender_runtime(cfg: PipelineConfig) -> dict:
    """How the config's defender runs, whatever checkpoint it loads: ``defender.model.device``
    (default cpu), ``vision_attention`` (default grouped: models/vision_attention.py),
    ``image_device`` (where the image processor runs; default the CPU) and ``text_attention``
    (default packed: models/text_attention.py)."""
    m = cfg.defender.model
    return {
        "device": m.get("device", "cpu"),
        "vision_attention": m.get("vision_attention", DEFAULT_VISION_ATTENTION),
        "image_device": m.get("image_device"),
        "text_attention": m.get("text_attention", DEFAULT_TEXT_ATTENTION),
    }


def load_defender(
    store: ShardStore,
    version: str,
    device: str = "cpu",
    vision_attention: str = DEFAULT_VISION_ATTENTION,
    image_device: str | None = None,
    text_attention: str = DEFAULT_TEXT_ATTENTION,
):
    """A trained defender version as a policy (its files cached locally by version id)."""
    from models.qwen_vl import QwenVLPolicy

    m = store.manifest(version)
    if m.stage != "defender":
        raise ValueError(f"{version} is a {m.stage} version, not a defender checkpoint")
    run = dict(
        device=device, vision_attention=vision_attention, image_device=image_device, text_attention=text_attention
    )
    return QwenVLPolicy.from_pretrained(str(fetch_version(store, m)), **run)


def defender_from_version(version: str, root: str, storage_options: dict | None = None, **runtime):
    """The ``version`` defender backend: a defender trained by the pipeline (a version under ``root``)."""
    return load_defender(ShardStore(root, storage_options), version, **runtime)


TRAINABLE_BASES = ("tiny", "qwen-vl")  # Stage 2 defenders that are policies (perception-baseline is not)


def initial_model_spec(cfg: PipelineConfig) -> dict:
    """``defender.model`` as the loop starts from it. ``{backend: base}``: Stage 2's base defender
    (``models.defender``, with a tiny one's warm-up on the run's world), as AOT starts its defender
    from the model its data was filtered against; its resolved spec goes into the version id."""
    spec = cfg.defender.model
    if spec.get("backend") != "base":
        return spec
    from stages.registry import normalize_spec

    base = normalize_spec("defender", cfg.model_spec("defender"))
    if base["backend"] not in TRAINABLE_BASES:
        raise ConfigError(  # a ValueError the CLI prints in one line
            f"defender.model {{backend: base}} starts from models.defender, which is {base['backend']!r}: "
            f"not a trainable policy; set models.defender to one of {', '.join(TRAINABLE_BASES)}, or "
            "defender.model to {backend: tiny, ...}"
        )
    return {**spec, "base": base}


def _initial_policy(store: ShardStore, cfg: PipelineConfig, init_version: str | None):
    from models.qwen_vl import load_policy

    if init_version:
        return load_defender(store, init_version, **defender_runtime(cfg))
    spec = initial_model_spec(cfg)
    if spec.get("backend") != "base":
        return load_policy(spec)
    from stages.registry import backend

    base = {k: v for k, v in spec["base"].items() if k != "backend"}
    run = {k: v for k, v in spec.items() if k not in ("backend", "base")}  # e.g. device: where it trains
    # A fresh instance, never the registry's shared (cached) one: training changes its weights in place.
    return backend("defender", spec["base"]).make(**{**base, **run})


MODULES = (__name__,)  # the code of a defender version: this module and what it imports


def train_defender_version(
    store: ShardStore,
    cfg: PipelineConfig,
    data_version: str,
    init_version: str | None = None,
    mode: str = "sft",
    on_step: Callable[[dict], None] | None = None,
    also: Sequence[str] = (),
) -> tuple[Manifest, bool]:
    """Train (or find) the defender version for these inputs. Returns (manifest, trained_now).
    ``also``: further dataset versions whose examples join ``data_version``'s (the co-evolution
    loop's earlier curricula, ``coevolution.curriculum_replay``); the version is written under
    ``data_version``'s dataset. Under torchrun every rank trains (data parallel) and rank 0
    writes the version."""
    data = store.manifest(data_version)
    extra_data = [store.manifest(v) for v in also]
    parents = [data.version] + [m.version for m in extra_data] + ([init_version] if init_version else [])
    d, train_cfg = cfg.defender, defender_train_config(cfg, mode)
    vcfg = {
        "defender": {
            "model": initial_model_spec(cfg),
            "images": d.images,
            "max_examples": d.max_examples,
            "mode": mode,
            # share_prompts off: the ids versions had before the option (it changes float rounding only)
            "train": {k: v for k, v in dataclasses.asdict(train_cfg).items() if k != "share_prompts" or v},
            # named, not only in the parents: an init version and a replayed one would otherwise
            # give the same parent list
            **({"also": [m.version for m in extra_data]} if extra_data else {}),
        }
    }
    runtime = defender_runtime(cfg)

    def compute(version: str) -> VersionPart | None:
        from models.qwen_vl import QwenVLPolicy

        examples = [ex for m in [data, *extra_data] for ex in examples_from_version(store, m, d.images, d.max_examples)]
        with tempfile.TemporaryDirectory() as tmp:
            resume = resume_folder(store, data.dataset, "defender", version, tmp)
            policy = (
                QwenVLPolicy.from_pretrained(resume, **runtime) if resume else _initial_policy(store, cfg, init_version)
            )
            trainer = DefenderTrainer(policy, examples, train_cfg, resume_from=resume)
            train_resumably(
                trainer,
                store,
                data.dataset,
                "defender",
                version,
                tmp,
                train_cfg.steps,
                train_cfg.checkpoint_every,
                on_step,
                cfg.tracking.report_to,
                vcfg,
                parents,
            )
            if not is_main():  # rank 0 writes the version (the weights are the same on every rank)
                barrier()
                return None
            plot = (
                (["loss"] + (["heldback_accuracy"] if trainer.held_back else []))
                if train_cfg.mode == "sft"
                else ["reward", "accuracy", "kept_group_fraction", "entropy"]
            )
            return trained_part(
                trainer,
                store,
                data.dataset,
                "defender",
                version,
                tmp,
                plot,
                len(examples),
                {
                    "mode": mode,
                    "examples": len(trainer.examples),
                    "held_back": len(trainer.held_back),
                    "target_reached": trainer.reached,
                    "ranks": trainer.world,
                },
            )

    m, trained = single_part_version(
        store, data.dataset, "defender", vcfg, parents, MODULES, compute, kernel_family([runtime["device"]])
    )
    if trained and is_main():
        barrier()  # the other ranks read the manifest once it is written
    return m, trained


EVALUATION = {
    "id": pl.String,
    "image_kind": pl.String,
    "answer": pl.String,
    "response": pl.String,
    "prediction": pl.String,
    "correct": pl.Boolean,
    "strict_format": pl.Boolean,
}


def evaluate_defender_version(
    store: ShardStore, cfg: PipelineConfig, checkpoint_version: str, data_version: str
) -> Manifest:
    """Greedy answers of a defender on a dataset version, per item, as a versioned table (stage
    ``evaluation``). The summary (accuracy on clean and on adversarial images separately, strict
    format, unparsed) is in the manifest's ``extra``."""
    data = store.manifest(data_version)
    config = {"images": cfg.defender.images, "max_examples": cfg.defender.max_examples}
    runtime = defender_runtime(cfg)

    def compute(version: str) -> VersionPart:
        examples = examples_from_version(store, data, cfg.defender.images, cfg.defender.max_examples)
        rows = answer_items(load_defender(store, checkpoint_version, **runtime), examples)
        for r in rows:  # example ids are "<row id>:<clean|adversarial>"
            r["id"], r["image_kind"] = r["id"].rsplit(":", 1)
        df = pl.DataFrame(rows, schema=EVALUATION)
        summary: dict = {"n": df.height}
        for kind in ("clean", "adversarial"):
            sub = df.filter(pl.col("image_kind") == kind)
            if sub.height:
                summary[f"{kind}_accuracy"] = float(sub["correct"].mean())
                summary[f"{kind}_n"] = sub.height
        summary["strict_format"] = float(df["strict_format"].mean()) if df.height else 0.0
        summary["unparsed"] = float(df["prediction"].is_null().mean()) if df.height else 0.0
        return VersionPart(df, df.height, extra={"summary": summary})

    return single_part_version(
        store,
        data.dataset,
        "evaluation",
        config,
        [checkpoint_version, data_version],
        MODULES,
        compute,
        kernel_family([runtime["device"]]),
    )[0]
