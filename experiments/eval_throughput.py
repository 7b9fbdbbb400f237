"""Evaluation throughput: Qwen2.5-VL-7B architecture (random weights) on HRBench-size images,
in-process through our evaluator, per input path and batch size, in one run.

Images are 3840x2160 (HRBench-4K size) and are resized by the processor to at most 2048x2048
pixels (METHOD.md: defender images between 512^2 and 2048^2); 16 new tokens per answer. Paths
(``--modes``): ``inline`` (the processor on the CPU, then the model: the path before prefetching),
``prefetch`` (the next batch's inputs made in a worker thread while this one is answered,
evaluation/answers.ask), ``prefetchN`` (the next N batches' inputs, in N worker threads, each with
its own processor), ``gpu-images`` / ``gpu-imagesN`` (prefetch, and the image processor on the
model's device: ``defender.model.image_device``). Each row's answers are compared with the first
row's (they must be identical). Beside them it prints the model's floor per item (``item_floors``:
the FLOPs of the vision tower and the prefill at the matmul rate measured in the run, plus the
decoding steps' weight reads at the measured bandwidth) and the items/s no path can beat: a goal
above that ceiling is out of reach on this card at this size. ``--profile`` adds one pass with
the vision tower timed apart and the model's operators traced (the ``profile`` row). ``--tiny`` is
a CPU smoke run. Writes ``$OUT/eval_throughput.json``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from evaluation.harness import STRICT, evaluate  # noqa: E402
from evaluation.readers import Item  # noqa: E402
from experiments.common import device as current_device  # noqa: E402
from experiments.common import environment, matmul_tflops, memory_gbs, parser, write_results  # noqa: E402

MODES = ("inline", "prefetch", "gpu-images")


def parse_mode(mode: str) -> tuple[str, int]:
    """``prefetch4`` -> ("prefetch", 4): the path and its number of prefetch workers (0 inline)."""
    path = mode.rstrip("0123456789")
    if path not in MODES or (path == "inline" and path != mode):
        raise SystemExit(f"--modes: {mode!r} is not one of {', '.join(MODES)} (prefetch and gpu-images take a count)")
    return path, 0 if path == "inline" else int(mode[len(path) :] or 1)


NEW_TOKENS = 16  # tokens per answer: QwenVLPolicy.generate's default, which the evaluator uses
QUESTION = "What is written on the sign in the top left corner?"


def benchmark_policy(device: str, tiny: bool, arch: str | None = None):
    """(policy, (w, h), max_pixels): the Qwen2.5-VL policy whose processor resizes HRBench-4K-size
    images (3840x2160) to at most 2048x2048 pixels, as METHOD.md's defender does (``tiny``: 384x216
    at most 64x64, a CPU smoke run). The processor is the same for every ``arch``."""
    from experiments.defender_dapo import build
    from models.qwen_vl import QwenVLPolicy

    arch = arch or ("tiny" if tiny else "7b")
    (w, h), px = ((384, 216), 64 * 64) if tiny else ((3840, 2160), 2048 * 2048)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model, proc = build(arch, device, dtype)
    ip = proc.image_processor
    ip.min_pixels, ip.max_pixels = 32 * 32 if tiny else 512 * 512, px
    ip.size = {"shortest_edge": ip.min_pixels, "longest_edge": px}
    return QwenVLPolicy(model, proc, device=device, dtype=dtype), (w, h), px


def random_images(n: int, w: int, h: int) -> list:
    """``n`` seeded noise images of w x h: every pixel differs, as a photo's do, for the resize."""
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for _ in range(n)]


def item_flops(model, patches: int, prompt_tokens: int) -> dict:
    """FLOPs of one item's forward that no path avoids (a lower bound: norms, rotary and the
    vision tower's windowed attention, under 1% on the 7B, are left out). Vision tower: 2 FLOPs per
    weight and patch (the merger's weights act once per ``spatial_merge_size``^2 patches), plus the
    full-attention layers' scores and weighted sums, 4 P^2 d each (an image attends only to itself).
    Prefill of ``prompt_tokens`` (image tokens included): 2 FLOPs per language-model weight and token
    (the token embedding is a lookup) plus causal attention, 2 T^2 d per layer; the answer's first
    token's head: 2 x vocab x hidden."""
    vc, tc = model.config.vision_config, model.config.text_config
    visual, lm = model.model.visual, model.model.language_model
    merger = sum(p.numel() for p in visual.merger.parameters())
    per_patch = sum(p.numel() for p in visual.parameters()) - merger
    full_layers = len(getattr(vc, "fullatt_block_indexes", None) or [])
    vision = 2 * per_patch * patches + 2 * merger * patches // vc.spatial_merge_size**2
    vision += full_layers * 4 * patches**2 * vc.hidden_size
    q_dim = tc.num_attention_heads * (getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads)
    weights = sum(p.numel() for p in lm.parameters()) - lm.embed_tokens.weight.numel()
    prefill = 2 * weights * prompt_tokens + tc.num_hidden_layers * 2 * prompt_tokens**2 * q_dim
    prefill += 2 * model.lm_head.weight.numel()
    return {"vision": vision, "prefill": prefill}


def item_floors(policy, item: Item, new_tokens: int, batches: list[int], tflops: float, gbs: float) -> list[dict]:
    """Seconds per item the card cannot beat at each of ``batches`` items a call: ``item_flops``
    (the item encoded once, as the evaluator prompts it) at the measured matmul rate, plus
    ``new_tokens`` - 1 decoding steps that each read the language model's weights and head once for
    the whole batch (``defender_dapo.generation_floor``; the first token comes with the prefill).
    The image processor's CPU time is not in it: prefetching can hide it entirely."""
    from evaluation.harness import present
    from experiments.defender_dapo import generation_floor

    model = policy.model
    prompt, _, _ = present(item, STRICT)
    enc, _ = policy.encode([item.image], [prompt])
    patches, tokens = int(enc["image_grid_thw"][0].prod()), int(enc["input_ids"].shape[1])
    flops = item_flops(model, patches, tokens)
    decoded = [*model.model.language_model.layers.parameters(), model.lm_head.weight]
    weights, size = sum(p.numel() for p in decoded), decoded[0].element_size()
    compute_s = (flops["vision"] + flops["prefill"]) / (tflops * 1e12)
    out = []
    for batch in batches:
        decode_s = generation_floor(new_tokens - 1, weights, size, gbs) / batch
        out.append(
            {
                "batch": batch,
                "patches": patches,
                "prompt_tokens": tokens,
                **{f"{k}_tflop": v / 1e12 for k, v in flops.items()},
                "compute_s": compute_s,
                "decode_s": decode_s,
                "floor_s_per_item": compute_s + decode_s,
                "ceiling_items_per_s": 1 / (compute_s + decode_s),
            }
        )
    return out


def profiled_pass(policy, items, batch: int, device: str) -> dict:
    """One evaluation pass (one prefetch worker, ``batch`` items a call) with the vision tower's
    forwards timed apart (synchronized around each call) and every operator under torch.profiler:
    the seconds per item in the vision tower and in the rest of the model (the language model's
    prefill and decoding), and the top operators (experiments/defender_dapo.summarize_profile)."""
    from torch.profiler import ProfilerActivity, profile

    from experiments.defender_dapo import summarize_profile, sync

    visual = policy.model.model.visual
    inner, spent, own = visual.forward, [], visual.__dict__.get("forward")

    def timed(*args, **kw):
        sync(device)
        t0 = time.perf_counter()
        out = inner(*args, **kw)
        sync(device)
        spent.append(time.perf_counter() - t0)
        return out

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    visual.forward = timed
    try:
        with profile(activities=acts) as prof:
            t0 = time.perf_counter()
            evaluate(policy, f"profile-b{batch}", items, STRICT, batch_size=batch, prefetch=1)
            sync(device)
            total = time.perf_counter() - t0
    finally:  # the forward it had: its own if it was patched, else the class's
        if own is None:
            del visual.forward
        else:
            visual.forward = own
    ops = summarize_profile(prof.key_averages(), device)
    n = len(items)
    return {
        "mode": "profile",
        "batch": batch,
        "seconds": total,
        "vision_s_per_item": sum(spent) / n,
        "vision_calls": len(spent),
        "rest_s_per_item": (total - sum(spent)) / n,
        **{f"{c}_share": v["share"] for c, v in ops["categories"].items()},
        "top": ops["top"],
    }


def main():
    ap = parser(__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=16)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--modes", default="inline,prefetch,prefetch4,gpu-images,gpu-images4")
    ap.add_argument(
        "--profile",
        action="store_true",
        help="after the timed rows, one more pass (prefetch, the largest batch) with the vision tower timed "
        "apart from the rest and the model's operators under torch.profiler: where an item's model time goes",
    )
    a = ap.parse_args()
    device = current_device()
    arch = "tiny" if a.tiny else "7b"
    policy, (w, h), px = benchmark_policy(device, a.tiny, arch)
    policy.model.generation_config.min_new_tokens = NEW_TOKENS  # random weights: same answer length every time
    items = [
        Item(f"i{i}", "hrbench4k", im, QUESTION, "A", ["cat", "dog", "bird", "fish"], ["single"])
        for i, im in enumerate(random_images(a.items, w, h))
    ]
    info = environment(arch=arch, image=[w, h], max_pixels=px, items=a.items, new_tokens=NEW_TOKENS)
    info.update(bf16_matmul_tflops=matmul_tflops(device), memory_gbs=memory_gbs(device, 64 if a.tiny else 1024))
    batches = [int(x) for x in a.batches.split(",")]
    info["floors"] = item_floors(policy, items[0], NEW_TOKENS, batches, info["bf16_matmul_tflops"], info["memory_gbs"])
    print(json.dumps(info), flush=True)
    evaluate(policy, "warm", items[:2], STRICT, batch_size=2)  # warm-up: kernels, allocator
    rows, first = [], None
    for mode in a.modes.split(","):
        path, workers = parse_mode(mode)
        policy.image_device = device if path == "gpu-images" else None
        for b in batches:
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            # a fresh model id per row: nothing comes from the answer cache
            got = evaluate(policy, f"{mode}-b{b}", items, STRICT, batch_size=b, prefetch=workers)
            if device == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            answers = [r["responses"] for r in got]
            first = first if first is not None else answers
            rows.append(
                {
                    "mode": mode,
                    "batch": b,
                    "seconds": dt,
                    "items_per_s": a.items / dt,
                    "answers_identical": answers == first,
                    "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan"),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    prof = [profiled_pass(policy, items, max(batches), device)] if a.profile else []
    for p in prof:
        print(json.dumps({k: v for k, v in p.items() if k != "top"}), flush=True)
    base = rows[0]["items_per_s"]
    best_inline = max((r["items_per_s"] for r in rows if r["mode"] == "inline"), default=base)
    ceiling = {f["batch"]: f["ceiling_items_per_s"] for f in info["floors"]}
    for r in rows:
        r["speedup_vs_first"] = r["items_per_s"] / base
        r["speedup_vs_best_inline"] = r["items_per_s"] / best_inline
        r["share_of_ceiling"] = r["items_per_s"] / ceiling[r["batch"]]
    write_results(a.out, "eval_throughput", info, rows + prof)
    print(
        f"\n{'mode':>11}{'batch':>6}{'seconds':>9}{'items/s':>9}{'vs 1st':>8}{'vs inline':>10}"
        f"{'same':>6}{'peak GiB':>10}{'ceiling':>9}{'of it':>7}"
    )
    for r in rows:
        print(
            f"{r['mode']:>11}{r['batch']:>6}{r['seconds']:>9.1f}{r['items_per_s']:>9.2f}{r['speedup_vs_first']:>8.2f}"
            f"{r['speedup_vs_best_inline']:>10.2f}{str(r['answers_identical']):>6}{r['peak_gib']:>10.1f}"
            f"{ceiling[r['batch']]:>9.2f}{r['share_of_ceiling']:>7.0%}"
        )
    for f in info["floors"]:
        print(
            f"floor at batch {f['batch']}: {f['floor_s_per_item']:.3f} s/item ({f['vision_tflop']:.1f} TFLOP vision + "
            f"{f['prefill_tflop']:.1f} prefill over {f['patches']} patches and {f['prompt_tokens']} tokens at "
            f"{info['bf16_matmul_tflops']:.0f} TFLOP/s, {f['decode_s']:.3f} s of decoding reads at "
            f"{info['memory_gbs']:.0f} GB/s): no path beats {f['ceiling_items_per_s']:.2f} items/s; 4x the first "
            f"row is {4 * base:.2f} items/s, {4 * base / f['ceiling_items_per_s']:.0%} of it"
        )


if __name__ == "__main__":
    main()
