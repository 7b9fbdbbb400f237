"""A stage's shards on several GPUs, one worker process per card (issue 7), against one card.

    python experiments/shard_parallel.py --gpus 1 2 --shards 8     # on a 2-GPU machine
    python experiments/shard_parallel.py --tiny --gpus 1 2          # CPU smoke run (tiny model)

What `deploy/gpu-workers.sh` and the `dask-gpus` task runner do, without Prefect (GPU benchmarks
call the pure modules): for each world size W, W processes start, each seeing one card
(``CUDA_VISIBLE_DEVICES=i``); each builds the outpainting model (FLUX.1-Fill-dev's architecture,
random weights, as `data_stages.py`), warms it up, waits until all W are ready, then runs the
extend stage function on its shards (i, i + W, ...). Throughput = rows / (last shard's end - first
shard's start), so model building is not counted; scaling = W cards' throughput over one card's,
both measured in this run. Writes ``OUT/shard_parallel.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from experiments.common import environment, parser, write_results  # noqa: E402


def worker(rank: int, world: int, shards: int, rows: int, tiny: bool, folder: Path) -> None:
    """One card's process: build, warm up, meet the others, run shards rank, rank + world, ..."""
    import numpy as np
    import torch
    from PIL import Image

    from experiments.data_stages import extend_stage, flux_fill

    device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    filler = flux_fill(tiny, device, torch.bfloat16 if device == "cuda" else torch.float32)
    side, canvas = (48, 64) if tiny else (768, 1024)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8))
    extend_stage(filler, img, canvas, 1, shard_index=-1)()  # warm-up (kernels, allocator)
    build_s = time.perf_counter() - t0
    (folder / f"ready-{rank}").touch()
    while len(list(folder.glob("ready-*"))) < world:  # start together: the span measures processing only
        time.sleep(0.05)
    done = []
    for s in range(rank, shards, world):
        start = time.time()
        extend_stage(filler, img, canvas, rows, shard_index=s)()
        done.append({"shard": s, "start": start, "end": time.time()})
    card = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    (folder / f"rank-{rank}.json").write_text(
        json.dumps(
            {
                "rank": rank,
                "card": card,
                "build_s": build_s,
                "visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
                "shards": done,
            }
        )
    )


def run_world(world: int, a) -> dict:
    """W worker processes, one per card; their shard timings combined into one row."""
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for rank in range(world):
            env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(rank)}
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                str(rank),
                "--world",
                str(world),
                "--shards",
                str(a.shards),
                "--rows",
                str(a.rows),
                "--folder",
                tmp,
            ] + (["--tiny"] if a.tiny else [])
            procs.append(subprocess.Popen(cmd, env=env))
        codes = [p.wait() for p in procs]
        if any(codes):
            raise SystemExit(f"world {world}: worker exit codes {codes} (see their output above)")
        ranks = [json.loads((Path(tmp) / f"rank-{r}.json").read_text()) for r in range(world)]
    shards = [s for r in ranks for s in r["shards"]]
    span = max(s["end"] for s in shards) - min(s["start"] for s in shards)
    n_rows = len(shards) * a.rows
    return {
        "gpus": world,
        "shards": len(shards),
        "rows": n_rows,
        "span_s": span,
        "rows_per_s": n_rows / span,
        "shards_per_rank": [len(r["shards"]) for r in ranks],
        "visible": [r["visible"] for r in ranks],
        "cards": [r["card"] for r in ranks],
        "build_s": [round(r["build_s"], 1) for r in ranks],
        "shard_s_mean": sum(s["end"] - s["start"] for s in shards) / len(shards),
    }


def main() -> None:
    ap = parser(__doc__.splitlines()[0])
    ap.add_argument("--gpus", type=int, nargs="+", default=[1, 2], help="world sizes to run, the first is the baseline")
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--rows", type=int, default=3, help="rows per shard")
    ap.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker is not None:
        worker(a.worker, a.world, a.shards, a.rows, a.tiny, Path(a.folder))
        return
    if a.tiny:
        a.shards, a.rows = min(a.shards, 4), 1
    info = environment(
        arch="tiny" if a.tiny else "flux.1-fill-dev",
        shards=a.shards,
        rows_per_shard=a.rows,
        outpaint="48->64 px, 2 steps" if a.tiny else "768->1024 px, 8 steps",
    )
    print(json.dumps(info), flush=True)
    rows = []
    for w in a.gpus:
        r = run_world(w, a)
        r["scaling"] = r["rows_per_s"] / rows[0]["rows_per_s"] if rows else 1.0
        rows.append(r)
        print(json.dumps(r), flush=True)
        write_results(a.out, "shard_parallel", info, rows)
    print(f"\n{'GPUs':>4} {'shards':>6} {'rows':>5} {'span s':>8} {'rows/s':>7} {'scaling':>8} {'s/shard':>8}")
    for r in rows:
        print(
            f"{r['gpus']:>4} {r['shards']:>6} {r['rows']:>5} {r['span_s']:>8.2f} {r['rows_per_s']:>7.3f} "
            f"{r['scaling']:>7.2f}x {r['shard_s_mean']:>8.2f}"
        )


if __name__ == "__main__":
    main()
