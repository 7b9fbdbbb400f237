"""Attacker Flow-GRPO on one card: time per group (sampling, reward, training), training MFU
and peak GPU memory, with the full-size Qwen-Image-Edit transformer (random weights) and LoRA.

The transformer has Qwen-Image's published architecture (60 MMDiT blocks, 24 heads x 128,
joint attention dim 3584, ~20B parameters) in bf16; the VAE is the full-size
AutoencoderKLQwenImage. The 7B Qwen2.5-VL prompt encoder is not loaded: prompt embeddings are
random tensors of the real width and a typical length (``--text-tokens``), because encoding
happens once per group and is not what this measures. The reward is box contrast on the decoded
images (decode included; a defender's K answers are not). Everything else is the trainer as
users run it: ``AttackerTrainer.grpo_step`` with true CFG, LoRA rank 64 in float32, one group of
16 edits at 512 px sampled and trained in the same micro-batches.

MFU: model FLOPs of the update (forward + input-gradient backward of the trained steps, both
CFG branches, from the architecture — ``model_flops``, checked against torch's FlopCounterMode
on the tiny run — without recomputation) over the update time, against the card's bf16 matmul
rate measured in the same run.

GPU: ``python experiments/attacker_flow_grpo.py --out DIR``; CPU smoke run: ``--tiny``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from experiments.common import environment, matmul_tflops, parser, write_results  # noqa: E402

FULL = dict(
    patch_size=2,
    in_channels=64,
    out_channels=16,
    num_layers=60,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=3584,
    axes_dims_rope=(16, 56, 56),
)
TINY = dict(
    patch_size=2,
    in_channels=64,
    out_channels=16,
    num_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=64,
    axes_dims_rope=(4, 6, 6),
)
# Qwen-Image's published scheduler settings (dynamic exponential shift).
SCHEDULER = dict(
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=0.9,
    base_image_seq_len=256,
    max_image_seq_len=8192,
    shift_terminal=0.02,
    time_shift_type="exponential",
)


def build_editor(arch: dict, resolution: int, cfg_scale: float, text_tokens: int, device: str, dtype):
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImageEditPipeline,
        QwenImageTransformer2DModel,
    )

    from models.editor import EditCondition, QwenImageEditor

    torch.set_default_dtype(dtype)
    with torch.device(device):
        transformer = QwenImageTransformer2DModel(**arch)
        vae = (
            AutoencoderKLQwenImage()
            if arch is FULL
            else AutoencoderKLQwenImage(
                base_dim=24, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1, temperal_downsample=[False, True, True]
            )
        )
    torch.set_default_dtype(torch.float32)
    pipe = QwenImageEditPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER),
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        processor=None,
        transformer=transformer,
    )
    width = arch["joint_attention_dim"]

    class BenchEditor(QwenImageEditor):
        def condition(self, images, prompts):  # random prompt embeddings of the real width (no 7B encoder)
            g = torch.Generator().manual_seed(len(prompts))
            emb = lambda: torch.randn((len(images), text_tokens, width), generator=g).to(device, dtype)  # noqa: E731
            ims = [self.resize(im) for im in images]
            with torch.no_grad():
                lat = self.latents_of(ims)
            prompt = lambda: {"encoder_hidden_states": emb(), "encoder_hidden_states_mask": None}  # noqa: E731
            return EditCondition(prompt(), prompt() if self.cfg_scale > 1 else None, lat, ims[0].size)

    return BenchEditor(pipe, resolution=resolution, cfg_scale=cfg_scale, device=device, dtype=dtype)


def model_flops(arch: dict, n_img: int, n_txt: int, lora_params_per_block: int) -> tuple[float, float]:
    """(forward FLOPs of one transformer call, forward + backward FLOPs of one trained call), per
    sample, from the architecture: per-token linears of the image stream on the image tokens
    (edited + condition), of the text stream on the text tokens, joint attention over both.
    Training with frozen base weights: forward + input gradients (2x the linears, 3x attention)
    plus the LoRA's own forward/backward. Modulation layers act once per sample (negligible);
    recomputation (gradient checkpointing) is not counted: model FLOPs, not hardware FLOPs."""
    d = arch["attention_head_dim"] * arch["num_attention_heads"]
    per_stream = 4 * d * d + 2 * d * 4 * d  # q, k, v, out + MLP (4x)
    s = n_img + n_txt
    linear = 2 * per_stream * (n_img + n_txt)
    attn = 4 * s * s * d
    lora = 2 * lora_params_per_block * n_img  # LoRA on the image stream (and k/v of text: small)
    fwd = arch["num_layers"] * (linear + attn)
    train = arch["num_layers"] * (2 * linear + 3 * attn + 3 * lora)
    return float(fwd), float(train)


def counted_flops(ed, cond) -> float:
    """FlopCounterMode's count of one velocity call (checks ``model_flops`` on the tiny arch)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = ed.noise(cond)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        ed.velocity(x, torch.tensor(500.0), cond, guidance=False)
    return float(fc.get_total_flops())


def main() -> None:
    ap = parser(__doc__.splitlines()[0])
    ap.add_argument("--group", type=int, default=16)
    ap.add_argument("--micro-batch", type=int, default=0, help="0: the whole group at once")
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--window", type=int, default=2, help="trained SDE steps (0: all but the last)")
    ap.add_argument("--cfg", type=float, default=4.0)
    ap.add_argument("--text-tokens", type=int, default=512)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--iters", type=int, default=2, help="Flow-GRPO steps (the first includes warm-up)")
    ap.add_argument("--no-grad-ckpt", action="store_true")
    ap.add_argument(
        "--keep-blocks",
        type=int,
        nargs="+",
        default=[0],
        help="with gradient checkpointing: runs keeping the last K blocks' activations (not recomputed), "
        "one after another in this process (the first K is the baseline); stops at the first OOM",
    )
    ap.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile each transformer block (diffusers' compile_repeated_blocks)",
    )
    a = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.tiny:
        a.group, a.resolution, a.steps, a.text_tokens, a.rank, a.iters = 4, 64, 3, 16, 4, 1
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    info = environment(
        arch="tiny" if a.tiny else "qwen-image-edit-20b",
        bf16_matmul_tflops=matmul_tflops(device),
        group=a.group,
        micro_batch=a.micro_batch or a.group,
        resolution=a.resolution,
        steps=a.steps,
        window=a.window,
        cfg=a.cfg,
        text_tokens=a.text_tokens,
        lora_rank=a.rank,
        grad_ckpt=not a.no_grad_ckpt,
        compiled=a.compile,
        keep_blocks=a.keep_blocks,
    )
    print(json.dumps(info), flush=True)
    from PIL import Image

    from config import AttackerTrainConfig, FlowGrpoConfig
    from training.attacker import AttackerTrainer
    from training.attacker_rewards import AttackItem, box_contrast

    t0 = time.perf_counter()
    ed = build_editor(TINY if a.tiny else FULL, a.resolution, a.cfg, a.text_tokens, device, dtype)
    n_params = sum(p.numel() for p in ed.transformer.parameters())
    build_s = time.perf_counter() - t0
    mem = lambda: round(torch.cuda.memory_allocated() / 2**30, 2) if device == "cuda" else 0.0  # noqa: E731
    print(
        f"built: {n_params / 1e9:.2f}B params, dtype {next(ed.transformer.parameters()).dtype}, {mem()} GiB", flush=True
    )
    img = Image.new("RGB", (a.resolution, a.resolution), (120, 110, 100))
    r = a.resolution
    items = [AttackItem("bench", img, "add a distractor", [[r * 0.3, r * 0.3, r * 0.6, r * 0.6]])]
    cfg = AttackerTrainConfig(
        mode="grpo",
        steps=a.iters,
        groups_per_step=1,
        micro_batch=a.micro_batch,
        lora_rank=a.rank,
        lora_alpha=2 * a.rank,
        gradient_checkpointing=not a.no_grad_ckpt,
        compile=a.compile,
        async_rewards=True,
        flow_grpo=FlowGrpoConfig(group_size=a.group, sampling_steps=a.steps, train_window=a.window, noise_level=0.7),
    )
    tr = AttackerTrainer(ed, cfg, items=items, rewards={"contrast": box_contrast})
    n_lora = sum(p.numel() for p in ed.lora_parameters())
    print(f"LoRA: {n_lora / 1e6:.1f}M params, {mem()} GiB", flush=True)
    cond = ed.condition([img], ["x"])
    n_img, n_txt = 2 * cond.image_latents.shape[1], a.text_tokens  # edited + condition image tokens
    blocks = len(ed.transformer.transformer_blocks)
    fwd1, train1 = model_flops(
        TINY if a.tiny else FULL, n_img, n_txt, sum(p.numel() for p in ed.lora_parameters()) // blocks
    )
    branches = 2 if a.cfg > 1 else 1  # true CFG: two transformer calls per velocity
    fwd1, train1 = fwd1 * branches, train1 * branches
    if a.tiny:
        print(f"model_flops {fwd1 / branches:.4e} vs FlopCounterMode {counted_flops(ed, cond):.4e}", flush=True)
    print(f"flops/sample: velocity {fwd1:.3e}, trained step {train1:.3e}; {mem()} GiB", flush=True)
    meta = {
        **info,
        "transformer_params": n_params,
        "lora_params": n_lora,
        "build_s": build_s,
        "fwd_flops_per_sample_velocity": fwd1,
        "train_flops_per_sample_step": train1,
    }
    rows = []
    for keep, it in [(k, i) for k in a.keep_blocks for i in range(a.iters)]:
        if it == 0:
            if not a.no_grad_ckpt:
                ed.enable_gradient_checkpointing(keep)
            if device == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
        try:
            m = tr.grpo_step()
        except torch.OutOfMemoryError:
            print(f"keep_blocks {keep}: out of memory", flush=True)
            rows.append({"keep_blocks": keep, "iter": it, "oom": True})
            write_results(a.out, "attacker_flow_grpo", meta, rows)
            break
        tr.step += 1
        trained = m["trained_steps"]  # per micro-batch chunk, summed over chunks
        mb = a.micro_batch or a.group
        train_flops = train1 * mb * trained
        row = {
            "keep_blocks": keep,
            "iter": it,
            "sample_s": m["sample_seconds"],
            "reward_s": m["reward_seconds"],
            "update_s": m["update_seconds"],
            "group_s": m["sample_seconds"] + m["reward_seconds"] + m["update_seconds"],
            "trained_steps_per_traj": trained // max(1, a.group // mb),
            "update_tflops": train_flops / m["update_seconds"] / 1e12,
            "sample_tflops": fwd1 * a.group * a.steps / m["sample_seconds"] / 1e12,
        }
        row["update_mfu"] = row["update_tflops"] / info["bf16_matmul_tflops"] if device == "cuda" else float("nan")
        row["sample_mfu"] = row["sample_tflops"] / info["bf16_matmul_tflops"] if device == "cuda" else float("nan")
        row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
        rows.append(row)
        print(json.dumps(row), flush=True)
        write_results(a.out, "attacker_flow_grpo", meta, rows)
    print(
        f"{'keep':>4} {'iter':>4} {'sample s':>9} {'reward s':>9} {'update s':>9} {'group s':>8} "
        f"{'upd MFU':>8} {'smp MFU':>8} {'peak GiB':>9}"
    )
    for r_ in rows:
        if r_.get("oom"):
            print(f"{r_['keep_blocks']:>4} {r_['iter']:>4} out of memory")
            continue
        print(
            f"{r_['keep_blocks']:>4} {r_['iter']:>4} {r_['sample_s']:>9.2f} {r_['reward_s']:>9.2f} "
            f"{r_['update_s']:>9.2f} {r_['group_s']:>8.2f} "
            f"{r_['update_mfu']:>8.3f} {r_['sample_mfu']:>8.3f} {r_['peak_gib']:>9.1f}"
        )


if __name__ == "__main__":
    main()
