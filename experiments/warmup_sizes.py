"""Does a warmed tiny defender answer as well on Stage 2's extended canvases as on source-size scenes?

    python experiments/warmup_sizes.py DEFENDER_FOLDER [DEFENDER_FOLDER ...] [--scenes 192] [--out experiments/results]

For each saved defender (a warm-up's folder: models/fitted/warm-defender/<hash>, or one under
$AOT_CACHE/warm-defenders), the mean probability of the right letter (``answer_probability``: one
scoring forward, no sampling) on ``--scenes`` held-out scenes of the embedded default's world, once
at source size and once each painted by the world onto a canvas 1.5-2x larger per side (Stage 1's
synthetic outpainter and canvas range). Under mRoPE an image's tokens sit on its (h, w) grid, so a
defender warmed only on source-size scenes can fit those and fail the larger grids Stage 2 judges.
Writes ``OUT/warmup_sizes.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("defenders", nargs="+", help="saved defender folders")
    ap.add_argument("--scenes", type=int, default=192)
    ap.add_argument("--seed", type=int, default=777, help="world seed of the held-out scenes (not a warm-up's)")
    ap.add_argument("--out", default="experiments/results")
    args = ap.parse_args(argv)

    import numpy as np
    import torch

    from experiments.common import environment
    from models.qwen_vl import QwenVLPolicy
    from stages.registry import resolve_config
    from stages.source import world_rows
    from stages.warm_defender import example_of_row, extended_examples

    cfg = resolve_config("synthetic", [])
    source = [example_of_row(r) for r in world_rows(args.scenes, args.seed, cfg)]
    extended = extended_examples(args.scenes, args.seed, cfg, [1.5, 2.0])
    rows = []
    for folder in args.defenders:
        policy = QwenVLPolicy.from_pretrained(folder, device="cpu")
        key = Path(folder) / "aot_fit_key.json"
        row = {"defender": folder, "warmup": json.loads(key.read_text()).get("warmup") if key.exists() else None}
        for name, examples in (("source", source), ("extended", extended)):
            with torch.no_grad():
                p = policy.answer_probability(
                    [e.image for e in examples],
                    [e.prompt for e in examples],
                    [e.answer for e in examples],
                    [e.num_options for e in examples],
                )
            row[f"{name}_p_right"] = float(np.mean(p))
            row[f"{name}_items"] = len(examples)
        rows.append(row)
    print(f"{'defender':<60} {'P(right) source':>16} {'P(right) extended':>18}")
    for r in rows:
        print(f"{r['defender'][-60:]:<60} {r['source_p_right']:>16.3f} {r['extended_p_right']:>18.3f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "warmup_sizes.json").write_text(json.dumps({"env": environment(), "rows": rows}, indent=2))
    print(f"wrote {out / 'warmup_sizes.json'}")
    return rows


if __name__ == "__main__":
    main()
