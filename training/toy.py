"""Small synthetic tasks for learnability checks: exact labels, drawn from the world."""

from __future__ import annotations

import numpy as np

from models.mcq import format_prompt, letters
from training.defender import Example
from world import WorldConfig, generate_world, render

FIXED_COLOURS = ["red", "green", "blue", "yellow"]


def colour_examples(n: int, seed: int, resolution: int = 64) -> list[Example]:
    """'What is the colour of the <shape>?' over scenes holding one object whose colour is one of
    four, options always in the same order: the simplest question a tiny defender can learn."""
    out = []
    cfg = WorldConfig(resolution=resolution, objects_min=1, objects_max=1, outside_density=0.0, object_size=(0.3, 0.45))
    i = 0
    while len(out) < n:
        s = generate_world(int(np.random.SeedSequence([seed, i]).generate_state(1)[0]), cfg)
        i += 1
        obj = s.fully_visible()[0] if s.fully_visible() else None
        if obj is None or obj.colour not in FIXED_COLOURS:
            continue
        prompt = format_prompt(f"What is the colour of the {obj.category}?", FIXED_COLOURS)
        out.append(Example(f"toy-{seed}-{i}", render(s), prompt, letters(4)[FIXED_COLOURS.index(obj.colour)], 4))
    return out


def world_rows(n: int, seed: int, cfg=None, keep=lambda row: True) -> list[dict]:
    """The first ``n`` source rows (that ``keep`` accepts) of a synthetic world (``cfg.source``:
    question mix, resolution, objects; default: the default world) under ``seed``."""
    from stages.config import PipelineConfig
    from stages.source import scene_row
    from world import NoQuestion

    cfg, out, i = cfg or PipelineConfig(), [], 0
    while len(out) < n:
        try:
            row = scene_row(seed, i, cfg)
        except NoQuestion:
            row = None
        i += 1
        if row and keep(row):
            out.append(row)
    return out


def world_examples(n: int, seed: int, cfg=None) -> list[Example]:
    """``world_rows`` as training examples."""
    from storage import decode_image

    return [Example(r["id"], decode_image(r["image"]), format_prompt(r["question"], r["options"]), r["answer"],
                    len(r["options"])) for r in world_rows(n, seed, cfg)]


def warmed_tiny_defender(spec: dict, warmup: dict):
    """The tiny defender of ``spec`` after a short supervised warm-up on fresh synthetic scenes
    (``warmup``: steps, scenes, seed, lr, batch, and ``source``: the world's ``source`` config,
    default the default world; a stage passes its run's), so that Stage 2's base defender answers
    in the format and is not pure noise. Trained once per (spec, warm-up, code) and cached as
    safetensors under ``$AOT_CACHE/warm-defenders``; later loads read the cache."""
    import os
    import shutil
    import tempfile

    from models.qwen_vl import QwenVLPolicy, load_policy
    from stages.config import config_from_dict
    from stages.version import code_version
    from storage import content_hash
    from training.config import DefenderTrainConfig
    from training.defender import DefenderTrainer
    from models.cache import build_lock, cache_root

    w = {"steps": 100, "scenes": 256, "seed": 1, "lr": 1e-3, "batch": 32, **warmup}
    folder = cache_root() / "warm-defenders" / content_hash({"spec": spec, "warmup": w, "code": code_version()})
    device = spec.get("device", "cpu")
    with build_lock(folder):  # shard threads and other processes share one warm-up: the others wait
        if not (folder / "config.json").exists():
            policy = load_policy(spec)
            world = config_from_dict({"source": w["source"]}) if w.get("source") else None
            DefenderTrainer(policy, world_examples(w["scenes"], w["seed"], world), DefenderTrainConfig(
                mode="sft", steps=w["steps"], batch_prompts=w["batch"], micro_batch=w["batch"], lr=w["lr"],
                seed=w["seed"])).train()
            folder.parent.mkdir(parents=True, exist_ok=True)
            tmp = tempfile.mkdtemp(dir=folder.parent, prefix=".warm-")
            policy.save(tmp)
            try:
                os.replace(tmp, folder)
            except OSError:
                shutil.rmtree(tmp, ignore_errors=True)
    return QwenVLPolicy.from_pretrained(str(folder), device=device)
