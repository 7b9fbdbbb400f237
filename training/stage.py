"""The defender as a stage of the DAG: train on a dataset version, evaluate on one, load one.

A defender version lives at ``ROOT/<dataset>/defender/<version>/``: the checkpoint (model
safetensors, processor, trainer state), ``part-00000.parquet`` (the metrics, one row per step),
``metrics.png`` and a manifest whose parents are the dataset version and the starting
checkpoint (if any). Its id hashes the training config, the model spec, the code version and
the parents. While training, checkpoints go to ``_work/latest`` in the same folder; a rerun after
a crash resumes from there, and the manifest (written last) makes the version visible.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import polars as pl

from models.cache import cache_root
from models.mcq import format_prompt
from models.vision_attention import DEFAULT as DEFAULT_VISION_ATTENTION
from stages.config import PipelineConfig
from stages.version import code_version
from storage import Manifest, ShardStore, content_hash, decode_image
from training.distributed import barrier, is_main

CACHE = cache_root() / "checkpoints"
WORK = "_work/latest"


def examples_from_version(store: ShardStore, manifest: Manifest, images: str = "both", max_examples: int = 0):
    """Training/evaluation examples of a dataset version: (image, MCQ prompt, answer letter).

    AOT-SFT versions give their clean and/or adversarial image per row (``images``); every
    other stage's rows give their ``image``.
    """
    from training.defender import Example

    df = store.read(manifest)
    if max_examples:
        df = df.head(max_examples)
    if "clean_image" in df.columns:
        cols = {"clean": ["clean_image"], "adversarial": ["adversarial_image"], "both": ["clean_image", "adversarial_image"]}[images]
    else:
        cols = ["image"]
    out = []
    for row in df.iter_rows(named=True):
        prompt = format_prompt(row["question"], row["options"])
        for col in cols:
            # a curriculum row says what it is; other single-image rows are clean scenes
            kind = col.removesuffix("_image") if col != "image" else row.get("kind") or "clean"
            out.append(Example(f"{row['id']}:{kind}", decode_image(row[col]), prompt, row["answer"], len(row["options"])))
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


def defender_version_id(cfg: PipelineConfig, mode: str, parents: list[str]) -> dict:
    d = cfg.defender
    train = defender_train_config(cfg, mode)
    vcfg = {"defender": {"model": d.model, "images": d.images, "max_examples": d.max_examples, "mode": mode,
                         "train": dataclasses.asdict(train)}}
    return {"config": vcfg, "version": content_hash({"stage": "defender", "config": vcfg, "code": code_version(),
                                                     "parents": parents})}


def fetch_version(store: ShardStore, m: Manifest) -> Path:
    """A version's files in the local cache (by version id), downloaded once and verified."""
    local = CACHE / m.version
    if not local.exists():
        # Download beside the final folder (same filesystem), then rename: a reader never sees a
        # half-written checkpoint, and a concurrent loader that finished first simply wins.
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=CACHE, prefix=f".{m.version}-"))
        store.fetch_files(m, str(tmp))
        try:
            os.replace(tmp, local)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return local


def defender_runtime(cfg: PipelineConfig) -> dict:
    """How the config's defender runs, whatever checkpoint it loads: ``defender.model.device``
    (default cpu) and ``vision_attention`` (default grouped: models/vision_attention.py)."""
    m = cfg.defender.model
    return {"device": m.get("device", "cpu"), "vision_attention": m.get("vision_attention", DEFAULT_VISION_ATTENTION)}


def load_defender(store: ShardStore, version: str, device: str = "cpu", vision_attention: str = DEFAULT_VISION_ATTENTION):
    """A trained defender version as a policy (its files cached locally by version id)."""
    from models.qwen_vl import QwenVLPolicy

    m = store.manifest(version)
    if m.stage != "defender":
        raise ValueError(f"{version} is a {m.stage} version, not a defender checkpoint")
    return QwenVLPolicy.from_pretrained(str(fetch_version(store, m)), device=device, vision_attention=vision_attention)


def _initial_policy(store: ShardStore, cfg: PipelineConfig, init_version: str | None):
    from models.qwen_vl import load_policy

    return load_defender(store, init_version, **defender_runtime(cfg)) if init_version else load_policy(cfg.defender.model)


def train_defender_version(store: ShardStore, cfg: PipelineConfig, data_version: str, init_version: str | None = None,
                           mode: str = "sft", on_step: Callable[[dict], None] | None = None) -> tuple[Manifest, bool]:
    """Train (or find) the defender version for these inputs. Returns (manifest, trained_now)."""
    from training.defender import DefenderTrainer

    data = store.manifest(data_version)
    parents = [data.version] + ([init_version] if init_version else [])
    ident = defender_version_id(cfg, mode, parents)
    version = ident["version"]
    done = store.manifest_at(data.dataset, "defender", version)
    if done is not None:
        return done, False
    train_cfg = defender_train_config(cfg, mode)
    examples = examples_from_version(store, data, cfg.defender.images, cfg.defender.max_examples)
    with tempfile.TemporaryDirectory() as tmp:
        resume = None
        if store.get_folder(data.dataset, "defender", version, WORK, os.path.join(tmp, "resume")):
            from models.qwen_vl import QwenVLPolicy

            resume = os.path.join(tmp, "resume")  # a crashed run's last checkpoint: continue from it
            policy = QwenVLPolicy.from_pretrained(resume, **defender_runtime(cfg))
        else:
            policy = _initial_policy(store, cfg, init_version)
        trainer = DefenderTrainer(policy, examples, train_cfg, resume_from=resume)
        every = train_cfg.checkpoint_every

        def step_hook(row: dict) -> None:
            if on_step:
                on_step(row)
            if every and trainer.step % every == 0 and trainer.step < train_cfg.steps and is_main():
                ck = trainer.save(os.path.join(tmp, f"ck-{trainer.step}"))
                store.put_folder(data.dataset, "defender", version, str(ck), prefix=WORK)

        trainer.train(on_step=step_hook)
        if not is_main():  # data parallel: rank 0 writes the version (the weights are the same on every rank)
            barrier()
            return store.manifest_at(data.dataset, "defender", version), True
        final = trainer.save(os.path.join(tmp, "final"))
        metrics = pl.DataFrame(trainer.metrics) if trainer.metrics else pl.DataFrame({"step": []})
        plot_metrics(trainer.metrics, os.path.join(final, "metrics.png"),
                     (["loss"] + (["heldback_accuracy"] if trainer.held_back else [])) if train_cfg.mode == "sft"
                     else ["reward", "accuracy", "kept_group_fraction", "entropy"])
        files = store.put_folder(data.dataset, "defender", version, str(final))
        rec = store.write_shard(data.dataset, "defender", version, 0, content_hash(parents), len(examples), metrics,
                                pl.DataFrame(schema={"id": pl.String, "reason": pl.String}))
        last = trainer.metrics[-1] if trainer.metrics else {}
        m = store.commit(data.dataset, "defender", version, [rec], config=ident["config"], parents=parents,
                         code_version=code_version(), files=files,
                         extra={"mode": mode, "steps": trainer.step, "examples": len(trainer.examples),
                                "held_back": len(trainer.held_back), "target_reached": trainer.reached,
                                "ranks": trainer.world,
                                "final": {k: v for k, v in last.items() if isinstance(v, (int, float))}})
    barrier()
    return m, True


def plot_metrics(rows: list[dict], path: str, keys: list[str]) -> None:
    """One small panel per metric against the step (the run's plot artifact)."""
    if not rows:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.6), squeeze=False)
    steps = [r["step"] for r in rows]
    for ax, k in zip(axes[0], keys):
        ax.plot(steps, [r.get(k, float("nan")) for r in rows])
        ax.set_title(k)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def evaluate_defender_version(store: ShardStore, cfg: PipelineConfig, checkpoint_version: str, data_version: str) -> Manifest:
    """Greedy answers of a defender on a dataset version, per item, as a versioned table.

    The summary (accuracy on clean and on adversarial images separately, strict format,
    unparsed) is in the manifest's ``extra``.
    """
    from training.defender import answer_items

    data = store.manifest(data_version)
    ident = {"stage": "evaluation", "config": {"images": cfg.defender.images, "max_examples": cfg.defender.max_examples},
             "code": code_version(), "parents": [checkpoint_version, data_version]}
    version = content_hash(ident)
    done = store.manifest_at(data.dataset, "evaluation", version)
    if done is not None:
        return done
    examples = examples_from_version(store, data, cfg.defender.images, cfg.defender.max_examples)
    rows = answer_items(load_defender(store, checkpoint_version, **defender_runtime(cfg)), examples)
    for r in rows:  # example ids are "<row id>:<clean|adversarial>"
        r["id"], r["image_kind"] = r["id"].rsplit(":", 1)
    df = pl.DataFrame(rows, schema={"id": pl.String, "image_kind": pl.String, "answer": pl.String, "response": pl.String,
                                    "prediction": pl.String, "correct": pl.Boolean, "strict_format": pl.Boolean})
    summary = {"n": df.height}
    for kind in ("clean", "adversarial"):
        sub = df.filter(pl.col("image_kind") == kind)
        if sub.height:
            summary[f"{kind}_accuracy"] = float(sub["correct"].mean())
            summary[f"{kind}_n"] = sub.height
    summary["strict_format"] = float(df["strict_format"].mean()) if df.height else 0.0
    summary["unparsed"] = float(df["prediction"].is_null().mean()) if df.height else 0.0
    rec = store.write_shard(data.dataset, "evaluation", version, 0, content_hash(ident["parents"]), df.height, df,
                            pl.DataFrame(schema={"id": pl.String, "reason": pl.String}))
    return store.commit(data.dataset, "evaluation", version, [rec], config=ident["config"], parents=ident["parents"],
                        code_version=code_version(), extra={"summary": summary})
