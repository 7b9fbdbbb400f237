"""Data-parallel defender DAPO: the same global batch on 1 and on N GPUs (torchrun).

Qwen2.5-VL architecture (3B by default) with random weights, the trainer users run
(`DefenderTrainer.dapo_step`, data parallel through training/distributed.py: each rank samples
and scores its slice of the prompts, the loss is normalized over the global batch, gradients
are summed). Launch once per world size in the same session and compare (ratios):

    torchrun --nproc_per_node 1 experiments/defender_ddp.py --out DIR
    torchrun --nproc_per_node 2 experiments/defender_ddp.py --out DIR

Rank 0 writes ``DIR/defender_ddp_<N>.json`` (per-step wall time, generation / log-prob / update
split, peak memory). CPU smoke run: ``--tiny`` (gloo).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from experiments.common import environment, parser, write_results  # noqa: E402
from experiments.defender_dapo import build, rows  # noqa: E402
from models.qwen_vl import QwenVLPolicy  # noqa: E402
from training import distributed as dist  # noqa: E402


def main() -> None:
    ap = parser(__doc__.splitlines()[0])
    ap.add_argument("--arch", default="3b")
    ap.add_argument("--prompts", type=int, default=16, help="global prompts per step")
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--completion", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up step)")
    a = ap.parse_args()
    dist.init_from_env()
    rank, world = dist.rank_world()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    arch = "tiny" if a.tiny else a.arch
    if a.tiny:
        a.prompts, a.group, a.completion, a.steps = 4, 2, 8, 1
    from config import DefenderTrainConfig
    from rl.dapo import DapoConfig
    from training.defender import DefenderTrainer

    model, proc = build(arch, device, torch.bfloat16 if device == "cuda" else torch.float32)
    policy = QwenVLPolicy(model, proc, device=device, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    per_rank = a.prompts // world * a.group
    cfg = DefenderTrainConfig(
        mode="dapo",
        steps=a.steps + 1,
        batch_prompts=a.prompts,
        micro_batch=per_rank,
        lr=1e-6,
        max_new_tokens=a.completion,
        gradient_checkpointing=True,
        dapo=DapoConfig(group_size=a.group, dynamic_sampling=False, mask_truncated=False),
    )
    tr = DefenderTrainer(policy, rows(a.prompts * (a.steps + 1), 300), cfg)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    out = []
    for i in range(a.steps + 1):
        dist.barrier()
        t0 = time.perf_counter()
        r = tr.dapo_step()
        tr.step += 1
        if device == "cuda":
            torch.cuda.synchronize()
        dist.barrier()
        out.append(
            {
                "step": i,
                "step_s": time.perf_counter() - t0,
                "generation_s": r["sample_seconds"],
                "logprob_s": r["logprob_seconds"],
                "update_s": r["update_seconds"],
                "reward": r["reward"],
            }
        )
        if rank == 0:
            print(json.dumps(out[-1]), flush=True)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    if rank == 0:
        timed = out[1:]
        mean = sum(o["step_s"] for o in timed) / len(timed)
        seqs = a.prompts * a.group
        info = environment(arch=arch, world=world, global_prompts=a.prompts, group=a.group, completion=a.completion)
        summary = {
            "ranks": world,
            "mean_step_s": mean,
            "sequences_per_s": seqs / mean,
            "peak_gib_rank0": peak,
            "mean_generation_s": sum(o["generation_s"] for o in timed) / len(timed),
            "mean_update_s": sum(o["update_s"] for o in timed) / len(timed),
        }
        write_results(a.out, f"defender_ddp_{world}", {**info, "summary": summary}, out)
        print(f"{'ranks':>5} {'step s':>8} {'seq/s':>8} {'gen s':>8} {'update s':>9} {'peak GiB':>9}")
        print(
            f"{world:>5} {mean:>8.2f} {seqs / mean:>8.2f} {summary['mean_generation_s']:>8.2f} "
            f"{summary['mean_update_s']:>9.2f} {peak:>9.1f}"
        )


if __name__ == "__main__":
    main()
