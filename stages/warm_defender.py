"""The tiny defender backend, optionally warmed up: a supervised warm-up on fresh scenes of the
run's world, trained once and cached, so that Stage 2's base defender answers in the format and
is not pure noise (the ``tiny`` defender backend with a ``warmup`` option)."""

from __future__ import annotations

import json
from pathlib import Path

from models.cache import build_once, cache_root
from models.mcq import format_prompt
from models.progress import StepProgress
from models.qwen_vl import QwenVLPolicy, load_policy
from stages.source import NoQuestion, scene_row, world_rows
from storage import content_hash, decode_image
from training.defender import DefenderTrainer, Example

SHIPPED_KIND = "warm-defender"  # models/fitted/<this>/: warm-ups that ship with the code
KEY_FILE = "aot_fit_key.json"  # in a warm-up's folder: the key it was built under


def example_of_row(r: dict) -> Example:
    """A source row (``world_rows``) as the defender sees it: image, prompt, answer."""
    return Example(
        r["id"], decode_image(r["image"]), format_prompt(r["question"], r["options"]), r["answer"], len(r["options"])
    )


def world_examples(n: int, seed: int, cfg=None, canvas_scale=None) -> list[Example]:
    """``world_rows`` as training examples; with ``canvas_scale`` (a number or [min, max]) each
    scene is first extended as Stage 1 would (``extended_examples``)."""
    if canvas_scale is not None:
        return extended_examples(n, seed, cfg, canvas_scale)
    return [example_of_row(r) for r in world_rows(n, seed, cfg)]


def extended_examples(n: int, seed: int, cfg, canvas_scale) -> list[Example]:
    """``n`` warm-up examples at the sizes Stage 2 sees: each scene painted by the world itself
    onto a canvas ``canvas_scale`` times larger per side (drawn per scene, seeded), as Stage 1's
    synthetic outpainter does, less its seams. Why: under mRoPE an image's tokens sit on its
    (h, w) grid and the text after it starts past the grid, so a defender warmed only on
    source-size scenes answers far worse on the larger canvases it judges (mean P(right)
    0.64 -> 0.32: RESULTS.md). A scene whose border shows another object of its target's name
    is skipped, as Stage 1's duplication check would reject it: its answer is ambiguous."""
    import numpy as np

    from config import PipelineConfig, canvas_scale_range
    from models.synthetic import SceneJudge, SceneOutpainter
    from stages.extend import canvas_geometry

    lo, hi = canvas_scale_range(canvas_scale)
    cfg = cfg or PipelineConfig()
    painter, judge = SceneOutpainter(seam_rate=0.0), SceneJudge()
    out, i = [], -1
    while len(out) < n:
        i += 1
        try:
            row = scene_row(seed, i, cfg)
        except NoQuestion:
            continue
        image = decode_image(row["image"]).convert("RGB")
        scale = float(np.random.default_rng([seed, i, 17]).uniform(lo, hi))  # per scene: the first n never depend on n
        canvas, offset, _ = canvas_geometry(image.width, image.height, scale, max_pixels=1 << 62)
        painted = painter.outpaint(image, canvas, offset, json.loads(row["scene"]))
        source_box = [offset[0], offset[1], offset[0] + image.width, offset[1] + image.height]
        if not judge.check_duplication(painted.image, row["target_names"], source_box, painted.context).passed:
            continue
        prompt = format_prompt(row["question"], row["options"])
        out.append(Example(row["id"], painted.image, prompt, row["answer"], len(row["options"])))
    return out


def tiny_defender(warmup: dict | None = None, **spec) -> QwenVLPolicy:
    """The tiny Qwen2.5-VL defender; with ``warmup`` ({steps, scenes, seed, lr, batch}) after a
    short supervised warm-up on fresh synthetic scenes, trained once and cached."""
    if warmup is None:
        return load_policy({"backend": "tiny", **spec})
    return warmed_tiny_defender({"backend": "tiny", **spec}, warmup)


def warmed_tiny_defender(spec: dict, warmup: dict) -> QwenVLPolicy:
    """The tiny defender of ``spec`` after a short supervised warm-up on fresh synthetic scenes
    (``warmup``: steps, scenes, seed, lr, batch, canvas_scale (``extended_examples``; default:
    none, source-size scenes), and ``source``: the world's ``source`` config, default the default
    world; a stage passes its run's). Trained once per (spec, warm-up, code,
    kernel family) and cached as safetensors under ``$AOT_CACHE/warm-defenders``: the same
    warm-up on another CPU's kernels gives other weights (docs/reproducibility.md). A warm-up that
    ships with the code (models/fitted/warm-defender: the embedded default's, made by
    experiments/ship_fits.py) is loaded instead, on every machine the same bytes."""
    import torch

    from config import DefenderTrainConfig, config_from_dict
    from models.cache import shipped_fit
    from stages.version import code_version, kernel_family

    w = {"steps": 100, "scenes": 256, "seed": 1, "lr": 1e-3, "batch": 32, **warmup}
    device = spec.get("device", "cpu")
    key = {
        "spec": spec,
        "warmup": w,
        "code": code_version(["stages.warm_defender"]),
        "kernels": kernel_family([device]),
    }
    if torch.device(device).type == "cpu":  # a CPU's sums split by the intra-op thread count
        key["threads"] = torch.get_num_threads()
    shipped = shipped_fit(SHIPPED_KIND, key, suffix="")
    if shipped is not None:
        return QwenVLPolicy.from_pretrained(str(shipped), device=device)

    def build(folder) -> None:
        policy = load_policy(spec)
        world = config_from_dict({"source": w["source"]}) if w.get("source") else None
        # Once per machine, inside Stage 2's model load: minutes on a CPU with nothing else on screen.
        progress = StepProgress("defender warm-up", w["steps"])
        trainer = DefenderTrainer(
            policy,
            world_examples(w["scenes"], w["seed"], world, w.get("canvas_scale")),
            DefenderTrainConfig(
                mode="sft",
                steps=w["steps"],
                batch_prompts=w["batch"],
                micro_batch=w["batch"],
                lr=w["lr"],
                seed=w["seed"],
            ),
        )
        trainer.train(on_step=lambda row: progress(row["step"], row["loss"]))
        policy.save(str(folder))
        # The key rides along, so a cached warm-up says which it is (and ship_fits.py names it).
        (Path(folder) / KEY_FILE).write_text(json.dumps(key, sort_keys=True, default=str))

    folder = build_once(cache_root() / "warm-defenders" / content_hash(key), build)
    return QwenVLPolicy.from_pretrained(str(folder), device=device)
