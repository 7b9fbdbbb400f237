"""Defender DAPO throughput: our trainer against TRL's GRPOTrainer, side by side in one process.

Qwen2.5-VL architecture (3B by default) with random weights (no weights can be downloaded), one
448x448 image and ~300 prompt tokens per row, 256 completion tokens, 8 generations per prompt,
bf16 weights, gradient checkpointing, HF generate in both. Per step: generation, log-prob and
update time, completion and total tokens/s, update-phase MFU (6 N tokens against the card's
bf16 matmul rate measured in the same run), generation against its weight-reading floor (every
decoding step reads the text weights once, at the memory bandwidth measured in the same run),
peak GPU memory. With ``--lora-7b`` it also takes
DAPO steps of the 7B architecture with LoRA (rank 64), grouped vision attention and compiled
decoder layers (the full preset's update; one warm-up step, one timed), and reports the peak memory. With
``--profile`` the update phase of one extra step of each of our variants runs under torch.profiler
and its top operators (self device time, call counts) go into the JSON: where the update's time goes;
``--profile generation`` traces that step's rollouts instead, with kernels, kernel launches and CUDA
graph launches per decoding step (is the captured step one launch? what does a step run?).

GPU: ``python experiments/defender_dapo.py --out DIR``. CPU smoke run: ``--tiny`` (small
architecture, 1 step; checks that both code paths run).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from experiments.common import compiled_graphs, step_timing  # noqa: E402
from models.qwen_vl import SPECIAL, QwenVLPolicy, build_byte_tokenizer  # noqa: E402

ARCH = {
    # Published Qwen2.5-VL config values (text + vision).
    "3b": dict(
        text=dict(
            vocab_size=151936,
            hidden_size=2048,
            intermediate_size=11008,
            num_hidden_layers=36,
            num_attention_heads=16,
            num_key_value_heads=2,
            tie_word_embeddings=True,
            section=[16, 24, 24],
        ),
        vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048),
    ),
    "7b": dict(
        text=dict(
            vocab_size=152064,
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            tie_word_embeddings=False,
            section=[16, 24, 24],
        ),
        vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584),
    ),
    "tiny": dict(
        text=dict(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            tie_word_embeddings=True,
            section=[4, 6, 6],
        ),
        vision=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=64),
    ),
}


def build(arch: str, device: str, dtype):
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    tok = build_byte_tokenizer()
    a = ARCH[arch]
    t = dict(a["text"])
    section = t.pop("section")
    ids = {s: tok.convert_tokens_to_ids(s) for s in SPECIAL}
    text = dict(
        t,
        max_position_embeddings=32768,
        rope_theta=1e6,
        rope_scaling={"mrope_section": section, "rope_type": "default", "type": "default"},
        bos_token_id=ids["<|im_start|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    vision = dict(
        a["vision"],
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=112,
        fullatt_block_indexes=[7, 15, 23, 31] if a["vision"]["depth"] == 32 else [1],
    )
    cfg = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=t["tie_word_embeddings"],
    )
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration(cfg)
    torch.set_default_dtype(old)
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    px = 448 * 448
    kw = dict(min_pixels=px, max_pixels=px, patch_size=14, merge_size=2, temporal_patch_size=2)
    proc = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(**kw),
        tokenizer=tok,
        video_processor=Qwen2VLVideoProcessor(**kw),
        chat_template=tok.chat_template,
    )
    return model, proc


def rows(n: int, prompt_chars: int):
    import numpy as np
    from PIL import Image

    from training.defender import Example

    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        img = Image.fromarray(rng.integers(0, 256, (448, 448, 3), dtype=np.uint8))
        text = ("Where is the red circle relative to the blue square? " * 20)[:prompt_chars]
        out.append(Example(f"b{i}", img, text, "A", 4))
    return out


def param_counts(model) -> tuple[int, int]:
    vis = sum(p.numel() for n, p in model.named_parameters() if ".visual." in f".{n}" or n.startswith("visual"))
    return sum(p.numel() for p in model.parameters()) - vis, vis


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def run_ours(
    model,
    proc,
    device,
    batch,
    G,
    completion,
    steps,
    prompt_chars,
    warmup=2,
    lora=0,
    cache="dynamic",
    vision_attention="stock",
    profile: str | None = None,  # "update" or "generation": one extra step with that phase traced
    grad_ckpt=True,
    share_images=True,
    micro_batch=0,
    compile_update=False,
    text_attention="packed",
    share_prompts=False,
):
    from config import DefenderTrainConfig
    from rl.dapo import DapoConfig
    from training.defender import DefenderTrainer

    policy = QwenVLPolicy(
        model,
        proc,
        device=device,
        dtype=torch.bfloat16 if device == "cuda" else torch.float32,
        vision_attention=vision_attention,
        text_attention=text_attention,
    )
    policy.share_images = share_images
    total = warmup + steps + int(bool(profile))
    cfg = DefenderTrainConfig(
        mode="dapo",
        steps=total,
        batch_prompts=batch // G,
        micro_batch=micro_batch or batch,
        rollout_batch=batch,
        lr=1e-6,
        max_new_tokens=completion,
        gradient_checkpointing=grad_ckpt,
        lora_rank=lora,
        lora_alpha=2 * lora,
        decode_cache=cache,
        compile_update=compile_update,
        share_prompts=share_prompts,
        dapo=DapoConfig(group_size=G, dynamic_sampling=False, mask_truncated=False),
    )
    tr = DefenderTrainer(policy, rows(batch // G * total, prompt_chars), cfg)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    out, ops = [], None
    for n in range(total):
        sync(device)
        graphs = compiled_graphs()
        t0 = time.perf_counter()
        if profile and n == total - 1:  # the last step under the profiler (its timing is not counted)
            r, ops = profiled_generation(tr, device) if profile == "generation" else profiled(tr, device)
        else:
            r = tr.dapo_step()
        tr.step += 1
        sync(device)
        out.append(
            {
                "step_s": time.perf_counter() - t0,
                "generation_s": r["sample_seconds"],
                "logprob_s": r["logprob_seconds"],
                "update_s": r["update_seconds"],
                "completion_tokens": float(r["response_length"]) * batch,
                "compiled": compiled_graphs() - graphs,
            }
        )
        print(
            f"  step {n}: {out[-1]['step_s']:.2f} s (generation {r['sample_seconds']:.2f}, "
            f"update {r['update_seconds']:.2f}"
            f", {out[-1]['compiled']} graphs compiled)",
            flush=True,
        )
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    del tr, policy
    timed = out[warmup : warmup + steps]
    return timed, peak, ops


def profiled(trainer, device, top: int = 25):
    """One ``trainer.dapo_step()`` with its *update phase* under torch.profiler (tracing starts when
    the step's last rollout returns: the decoding steps would otherwise fill the trace): its
    result and the top operators by self device time (self CPU time on a CPU) with call counts."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    rollout = trainer.policy.rollout
    trace: dict = {}  # the profiler started after the latest rollout (more draws restart it)

    def rollout_then_trace(*a, **k):
        if trace:
            trace.pop("prof").stop()
        out = rollout(*a, **k)
        sync(device)
        trace["prof"] = profile(activities=acts)
        trace["prof"].start()
        return out

    try:
        res = step_with_rollout(trainer, device, rollout_then_trace)
    finally:
        if trace:
            trace["prof"].stop()
    return res, summarize_profile(trace["prof"].key_averages(), device, top)


def step_with_rollout(trainer, device, rollout):
    """One ``trainer.dapo_step()`` whose policy samples through ``rollout`` (a wrapper of its own)."""
    policy = trainer.policy
    policy.rollout = rollout
    try:
        res = trainer.dapo_step()
        sync(device)
    finally:
        policy.__dict__.pop("rollout", None)
    return res


def profiled_generation(trainer, device, top: int = 25):
    """One ``trainer.dapo_step()`` with its *rollouts* under torch.profiler (each rollout call
    traced, the rest of the step not): the top operators as ``profiled`` gives them, plus what sets
    a decoding step's cost when reading the weights does not — kernels run, and launch calls made
    (one CUDA graph launch replays many kernels), per decoding step, counted from the trace."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    rollout = trainer.policy.rollout
    profs, steps = [], []

    def traced_rollout(*a, **k):
        prof = profile(activities=acts)
        prof.start()
        try:
            out = rollout(*a, **k)
            sync(device)
        finally:
            prof.stop()
        profs.append(prof)
        steps.append(int(out.response_ids.shape[1]))  # decoding steps of this call
        return out

    res = step_with_rollout(trainer, device, traced_rollout)
    merged: dict = {}
    for prof in profs:
        for e in prof.key_averages():
            merged.setdefault(e.key, []).append(e)
    events = [_Summed(k, v) for k, v in merged.items()]
    summary = summarize_profile(events, device, top)
    n = max(1, sum(steps))
    kernels = sum(e.count for e in events if e.device_type == DeviceType.CUDA)
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
    graphs = sum(e.count for e in events if e.key in ("cudaGraphLaunch", "cuGraphLaunch"))
    summary.update(
        decoding_steps=sum(steps),
        kernels_per_step=kernels / n,
        kernel_launches_per_step=launches / n,
        graph_launches_per_step=graphs / n,
        traced_ms_per_step=summary["total_ms"] / n,
    )
    return res, summary


class _Summed:
    """Several profiles' rows of one operator as one row (the fields summarize_profile reads)."""

    def __init__(self, key, rows):
        self.key, self.device_type = key, rows[0].device_type
        self.count = sum(r.count for r in rows)
        self.self_device_time_total = sum(getattr(r, "self_device_time_total", 0.0) for r in rows)
        self.self_cpu_time_total = sum(r.self_cpu_time_total for r in rows)


CATEGORIES = (  # kernel (GPU) or operator (CPU) names -> what the time is spent on; first match wins
    ("attention", ("flash", "fmha", "attention", "sdpa")),  # before matmul: fmha_cutlass* kernels say "cutlass"
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "aten::mm", "aten::addmm", "aten::bmm", "aten::linear")),
)


def summarize_profile(events, device, top: int = 25) -> dict:
    """Top operators by self device time (self CPU time on a CPU), and the traced time split into
    matmul / attention / other. Shares are of the *kernel* time: operator rows and the kernels
    under them both carry device time, so summing every row would count it twice."""
    from torch.autograd import DeviceType

    key = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    units = [e for e in events if e.device_type == DeviceType.CUDA] if device == "cuda" else list(events)
    total = sum(getattr(e, key, 0.0) for e in units)
    cats = {name: 0.0 for name, _ in CATEGORIES} | {"other": 0.0}
    for e in units:
        name = e.key.lower()
        cat = next((c for c, words in CATEGORIES if any(w in name for w in words)), "other")
        cats[cat] += getattr(e, key, 0.0)
    rows = sorted(events, key=lambda e: getattr(e, key, 0.0), reverse=True)[:top]
    return {
        "total_ms": total / 1e3,
        "categories": {c: {"ms": v / 1e3, "share": v / max(total, 1e-9)} for c, v in cats.items()},
        "top": [
            {
                "op": e.key,
                "calls": e.count,
                "self_ms": getattr(e, key, 0.0) / 1e3,
                "share": getattr(e, key, 0.0) / max(total, 1e-9),
            }
            for e in rows
        ],
    }


def run_trl(model, proc, device, batch, G, completion, steps, prompt_chars, outdir, warmup=2, cache=None):
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback

    timings = {"gen": []}
    inner_generate = model.generate

    def timed_generate(*a, **k):
        sync(device)
        t0 = time.perf_counter()
        res = inner_generate(*a, **k)
        sync(device)
        timings["gen"].append(time.perf_counter() - t0)
        return res

    model.generate = timed_generate
    steps_t = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            sync(device)
            steps_t.append([time.perf_counter(), None, compiled_graphs()])

        def on_step_end(self, args, state, control, **kw):
            sync(device)
            steps_t[-1][1] = time.perf_counter()
            steps_t[-1][2] = compiled_graphs() - steps_t[-1][2]

    data = [
        {
            "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": e.prompt}]}],
            "image": e.image,
        }
        for e in rows(batch // G * (warmup + steps), prompt_chars)
    ]
    args = trl.GRPOConfig(
        output_dir=str(outdir),
        per_device_train_batch_size=batch,
        num_generations=G,
        max_completion_length=completion,
        loss_type="dapo",
        epsilon=0.2,
        epsilon_high=0.28,
        beta=0.0,
        learning_rate=1e-6,
        bf16=device == "cuda",
        use_cpu=device != "cuda",
        gradient_checkpointing=True,
        max_steps=warmup + steps,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        remove_unused_columns=False,
        temperature=1.0,
        shuffle_dataset=False,
        cache_implementation=cache,
    )
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer = trl.GRPOTrainer(
        model=model,
        reward_funcs=lambda completions, **kw: [0.0] * len(completions),
        args=args,
        train_dataset=Dataset.from_list(data),
        processing_class=proc,
        callbacks=[Clock()],
    )
    trainer.train()
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    model.generate = inner_generate
    print(f"trl: {len(steps_t)} steps timed, {len(timings['gen'])} generate calls", flush=True)
    out = []
    for (a, b, compiled), g in zip(steps_t, timings["gen"]):
        out.append(
            {
                "step_s": b - a,
                "generation_s": g,
                "logprob_s": 0.0,
                "update_s": (b - a) - g,
                "completion_tokens": float(batch * completion),
                "compiled": compiled,
            }
        )
    del trainer
    return out[warmup:], peak


def generation_floor(completion: int, n_text: int, weight_bytes: int, memory_gbs: float) -> float:
    """Seconds a rollout of ``completion`` decoding steps cannot beat: each step reads the text
    model's weights once (shared by the whole batch), at the measured bandwidth. Prefill, the
    vision tower and the KV cache's reads come on top, so the real floor is a little higher."""
    return completion * n_text * weight_bytes / (memory_gbs * 1e9)


def summarize(
    name,
    rows_,
    batch,
    prompt_tokens,
    completion,
    n_text,
    n_vis,
    patches,
    peak_tflops,
    peak_gib,
    images=None,
    floor_s=float("nan"),
    prompt_rows=None,
):
    """Per-step times under the timing protocol (``step_timing``): medians over the timed steps
    that compiled nothing, every step kept, steps over 1.5x the median flagged (``slow_steps``:
    on the H200 one update of 1.94 s between 0.90 and 0.78 s once pulled the mean, and the MFU,
    down a third). ``images``: images the vision tower runs on per update (default one per row;
    ours with shared images: one per prompt). MFU counts the FLOPs an implementation needs, 6 N per token
    (``prompt_rows``: the prompts it forwards, one per group with shared prompts; default every row).
    ``floor_s``: the generation's weight-reading floor (``generation_floor``), printed beside it."""
    compiled = [int(r.get("compiled") or 0) for r in rows_]
    parts = ("step_s", "generation_s", "logprob_s", "update_s")
    timing = {k: step_timing([r[k] for r in rows_], compiled) for k in parts}
    step, gen, lp, upd = (timing[k]["median"] for k in parts)
    steady = [r for i, r in enumerate(rows_) if i not in timing["step_s"]["compile_steps"]] or rows_
    comp = sum(r["completion_tokens"] for r in steady) / len(steady)
    seq_tokens = (batch if prompt_rows is None else prompt_rows) * prompt_tokens + comp
    flops = 6 * (n_text * seq_tokens + n_vis * (batch if images is None else images) * patches)
    slow = sorted({i for t in timing.values() for i in t["slow_steps"]})
    if slow:
        print(f"{name} batch {batch}: steps {slow} took over 1.5x the median (see *_steps)", flush=True)
    return {
        "impl": name,
        "batch": batch,
        "step_s": step,
        "generation_s": gen,
        "generation_floor_s": floor_s,
        "generation_vs_floor": gen / floor_s if floor_s > 0 else float("nan"),
        "logprob_s": lp,
        "update_s": upd,
        "completion_tok_s": comp / step,
        "total_tok_s": seq_tokens / step,
        "update_mfu": flops / max(upd, 1e-9) / (peak_tflops * 1e12) if peak_tflops == peak_tflops else float("nan"),
        "peak_gib": peak_gib,
        **{f"{k}_steps": t["steps"] for k, t in timing.items()},  # the spread a single figure hides
        "compile_steps": timing["step_s"]["compile_steps"],
        "slow_steps": slow,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="3b")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run with a tiny architecture")
    ap.add_argument("--batches", default="16,64")
    ap.add_argument("--generations", type=int, default=8)
    ap.add_argument("--completion", type=int, default=256)
    ap.add_argument("--prompt-chars", type=int, default=300)
    ap.add_argument("--steps", type=int, default=3, help="timed steps, after the warm-up steps")
    ap.add_argument(
        "--warmup",
        type=int,
        default=2,
        help="untimed steps first: compilation, and a second step still ~2x slower in the update on an H100",
    )
    ap.add_argument(
        "--impls",
        default="ours,trl",
        help="comma-separated: ours, ours-static (static KV cache, compiled decoding), ours-loop (the same "
        "cache and compiled step in our own decoding loop: models/decoding.py), ours-graph (that loop "
        "with the whole step captured as one CUDA graph), ours-grouped "
        "(vision windows batched: models/vision_attention.py), ours-nockpt (no gradient "
        "checkpointing: no recomputed forward, more memory), ours-unshared (every row through "
        "the processor and vision tower, as before models/shared_images.py), ours-mbN (update "
        "in micro-batches of N rows), ours-compiled (decoder layers compiled for the update: "
        "models/compiled_layers.py), ours-unpacked (a decoding step's attention with the key-value "
        "heads copied per query head, transformers' SDPA path, instead of models/text_attention.py), "
        "ours-sharedprompts (each group's completions scored after one copy of its prompt: "
        "models/shared_prompts.py); "
        "variants combine, e.g. ours-static-grouped-compiled; trl, "
        "trl-static (TRL's generation with cache_implementation='static', as ours-static)",
    )
    ap.add_argument(
        "--profile",
        nargs="?",
        const="update",
        choices=["update", "generation"],
        default=None,
        help="one extra step of each of ours with one phase under torch.profiler (update, the default, or "
        "generation: the rollouts, with kernel and CUDA-graph launches per decoded token); top operators "
        "into the JSON",
    )
    ap.add_argument("--lora-7b", action="store_true")
    ap.add_argument("--out", default="experiments/results")
    a = ap.parse_args()
    for impl in a.impls.split(","):  # before any model is built
        unknown = (
            {v for v in impl.split("-")[1:] if not (v[:2] == "mb" and v[2:].isdigit())}
            - {"static", "loop", "graph", "grouped", "nockpt", "unshared", "compiled", "unpacked", "sharedprompts"}
            if impl.startswith("ours")
            else ({impl} - {"trl", "trl-static"})
        )
        if unknown:
            raise SystemExit(f"unknown implementation or variant {sorted(unknown)} in {impl!r}; see --help for --impls")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    arch = "tiny" if a.tiny else a.arch
    if a.tiny:
        a.batches, a.completion, a.steps, a.warmup, a.prompt_chars, a.generations = "4", 8, 1, 1, 60, 2
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    from experiments.common import environment, matmul_tflops, memory_gbs

    info = environment(
        arch=arch, bf16_matmul_tflops=matmul_tflops(device), memory_gbs=memory_gbs(device, 64 if a.tiny else 1024)
    )
    print(json.dumps(info), flush=True)
    results = []
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    for batch in [int(b) for b in a.batches.split(",") if b.strip()]:
        for impl in a.impls.split(","):
            model, proc = build(arch, device, dtype)
            n_text, n_vis = param_counts(model)
            enc = proc(
                text=[
                    build_byte_tokenizer().apply_chat_template(
                        [
                            {
                                "role": "user",
                                "content": [
                                    {"type": "image"},
                                    {"type": "text", "text": rows(1, a.prompt_chars)[0].prompt},
                                ],
                            }
                        ],
                        add_generation_prompt=True,
                        tokenize=False,
                    )
                ],
                images=rows(1, a.prompt_chars)[0:1] and [rows(1, a.prompt_chars)[0].image],
                return_tensors="pt",
            )
            prompt_tokens = int(enc["input_ids"].shape[1])
            patches = int(enc["image_grid_thw"].prod())
            t0 = time.perf_counter()
            ops = None
            if impl.startswith("ours"):
                r, peak, ops = run_ours(
                    model,
                    proc,
                    device,
                    batch,
                    a.generations,
                    a.completion,
                    a.steps,
                    a.prompt_chars,
                    warmup=a.warmup,
                    cache=next((c for c in ("static", "loop", "graph") if c in impl.split("-")), "dynamic"),
                    vision_attention="grouped" if "grouped" in impl else "stock",
                    profile=a.profile,
                    grad_ckpt="nockpt" not in impl,
                    share_images="unshared" not in impl,
                    micro_batch=next((int(v[2:]) for v in impl.split("-") if v[:2] == "mb"), 0),
                    compile_update="compiled" in impl,
                    text_attention="stock" if "unpacked" in impl else "packed",
                    share_prompts="sharedprompts" in impl.split("-"),
                )
            else:
                r, peak = run_trl(
                    model,
                    proc,
                    device,
                    batch,
                    a.generations,
                    a.completion,
                    a.steps,
                    a.prompt_chars,
                    out / "trl-tmp",
                    warmup=a.warmup,
                    cache="static" if impl == "trl-static" else None,
                )
            shared = impl.startswith("ours") and "unshared" not in impl
            s = summarize(
                impl,
                r,
                batch,
                prompt_tokens,
                a.completion,
                n_text,
                n_vis,
                patches,
                info["bf16_matmul_tflops"],
                peak,
                images=batch // a.generations if shared else None,
                prompt_rows=batch // a.generations if "sharedprompts" in impl.split("-") else batch,
                floor_s=generation_floor(a.completion, n_text, torch.finfo(dtype).bits // 8, info["memory_gbs"]),
            )
            s.update(
                prompt_tokens=prompt_tokens, params_text=n_text, params_vision=n_vis, wall_s=time.perf_counter() - t0
            )
            if ops:
                s["profile"] = ops
                cats = ", ".join(f"{c} {v['share']:.0%}" for c, v in ops["categories"].items())
                per_step = (
                    f"; per decoding step {ops['kernels_per_step']:.0f} kernels, "
                    f"{ops['kernel_launches_per_step']:.0f} kernel launches, {ops['graph_launches_per_step']:.1f} "
                    f"graph launches, {ops['traced_ms_per_step']:.2f} ms of kernels"
                    if "decoding_steps" in ops
                    else ""
                )
                print(
                    f"{impl} batch {batch}: one profiled {a.profile}, {ops['total_ms']:.0f} ms traced ({cats})"
                    f"{per_step}; top operators:"
                )
                for o in ops["top"][:12]:
                    print(f"  {o['share']:6.1%} {o['self_ms']:9.1f} ms {o['calls']:>7} calls  {o['op'][:70]}")
            results.append(s)
            print(json.dumps({k: v for k, v in s.items() if k != "profile"}), flush=True)
            del model, proc
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
            (out / f"defender_dapo_{arch}.json").write_text(json.dumps({"info": info, "results": results}, indent=1))
    if a.lora_7b:
        model, proc = build("7b", device, dtype)
        n_text, n_vis = param_counts(model)
        r, peak, _ = run_ours(
            model,
            proc,
            device,
            16,
            a.generations,
            a.completion,
            1,
            a.prompt_chars,
            warmup=1,
            lora=64,
            vision_attention="grouped",
            compile_update=True,
        )
        lo = {
            "impl": "ours-7b-lora64-grouped-compiled",
            "batch": 16,
            "step_s": r[0]["step_s"],
            "generation_s": r[0]["generation_s"],
            "update_s": r[0]["update_s"],
            "peak_gib": peak,
            "params_text": n_text,
            "params_vision": n_vis,
        }
        results.append(lo)
        print(json.dumps(lo), flush=True)
        (out / f"defender_dapo_{arch}.json").write_text(json.dumps({"info": info, "results": results}, indent=1))
    print(
        f"\n{'impl':<16}{'batch':>6}{'step s':>8}{'gen s':>8}{'floor s':>8}{'x floor':>8}{'logp s':>8}{'upd s':>8}"
        f"{'compl tok/s':>12}{'total tok/s':>12}{'upd MFU':>9}{'peak GiB':>10}"
    )
    for s in results:
        print(
            f"{s['impl']:<16}{s['batch']:>6}{s['step_s']:>8.1f}{s['generation_s']:>8.1f}"
            f"{s.get('generation_floor_s', float('nan')):>8.2f}{s.get('generation_vs_floor', float('nan')):>8.1f}"
            f"{s.get('logprob_s', 0):>8.1f}"
            f"{s['update_s']:>8.1f}{s.get('completion_tok_s', float('nan')):>12.0f}"
            f"{s.get('total_tok_s', float('nan')):>12.0f}"
            f"{s.get('update_mfu', float('nan')):>9.1%}{s['peak_gib']:>10.1f}"
        )


if __name__ == "__main__":
    main()
