"""How fast evaluation's inputs are made, per number of prefetch workers: the CPU side that bounds
``experiments/eval_throughput.py`` on a fast card (issue 23).

The Qwen2.5-VL processor at the 7B architecture's settings (patch 14, merge 2, at most 2048x2048
pixels) prepares 3840x2160 images (HRBench-4K size) through ``evaluation.answers.ask`` for a
model whose answering costs nothing, so the time is the preparation alone. ``private``: each
worker with its own copy of the processor (``QwenVLPolicy.prepare``); ``shared``: every worker
through the one processor and its tokenizer's lock (the path before private copies), the
baseline of the same run. Writes ``$OUT/prepare_throughput.json``.

    python experiments/prepare_throughput.py --workers 1,2,4 --out OUT
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from evaluation.answers import ask  # noqa: E402
from experiments.common import environment, parser, write_results  # noqa: E402
from experiments.eval_throughput import QUESTION, benchmark_policy, random_images  # noqa: E402


def main():
    ap = parser(__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=16)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--repeats", type=int, default=2, help="timed passes per row; the fastest counts")
    a = ap.parse_args()
    torch.set_num_threads(1)  # the workers are the parallelism measured
    # eval_throughput's processor and images; a tiny model, which never runs
    policy, (w, h), px = benchmark_policy("cpu", a.tiny, arch="tiny")
    images, prompts = random_images(a.items, w, h), [QUESTION] * a.items

    class PrepareOnly:
        def __init__(self, prepare):
            self.prepare = prepare

        def generate(self, images, prompts, *, temperature=0.0, seed=0, encoded=None):
            return ["A"] * len(prompts)

    paths = {"shared": PrepareOnly(policy.encode), "private": PrepareOnly(policy.prepare)}
    info = environment(image=[w, h], max_pixels=px, items=a.items, batch=a.batch, cpus=os.cpu_count())
    rows = []
    for workers in [int(x) for x in a.workers.split(",")]:
        for path, m in paths.items():
            ask(m, images[: a.batch], prompts[: a.batch], batch_size=a.batch, prefetch=workers)  # copies made
            best = float("inf")
            for _ in range(a.repeats):
                t0 = time.perf_counter()
                ask(m, images, prompts, batch_size=a.batch, prefetch=workers)
                best = min(best, time.perf_counter() - t0)
            rows.append({"path": path, "workers": workers, "seconds": best, "images_per_s": a.items / best})
    base = next(r["images_per_s"] for r in rows if r["path"] == "shared" and r["workers"] == rows[0]["workers"])
    for r in rows:
        r["vs_shared_first"] = r["images_per_s"] / base
    write_results(a.out, "prepare_throughput", info, rows)
    print(f"\n{'path':>8}{'workers':>8}{'seconds':>9}{'images/s':>10}{'vs shared':>10}")
    for r in rows:
        print(
            f"{r['path']:>8}{r['workers']:>8}{r['seconds']:>9.2f}{r['images_per_s']:>10.2f}{r['vs_shared_first']:>10.2f}"
        )


if __name__ == "__main__":
    main()
