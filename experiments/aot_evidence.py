"""Issue 8's evidence experiment: base vs clean-only vs AOT, every seed, every attack.

    python experiments/aot_evidence.py                      # the GPU experiment (preset: evidence)
    python experiments/aot_evidence.py --tiny               # toy size on a CPU (checks the numbers appear)
    python experiments/aot_evidence.py --set defender.rl.steps=50 --seeds 0 1
    python experiments/aot_evidence.py --merge a.json b.json  # runs that did other seeds of one config

Prints the evidence table (arms x {clean, each attack}, mean ± spread over seeds), the
co-evolution curve per iteration and the goals as measured; writes ``OUT/aot_evidence.json``
and the curve plot ``OUT/aot_evidence_curve.png``. Every stage is a version under ``--root``:
rerunning after a crash continues where it stopped, and a finished run recomputes nothing.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.common import add_config_args, environment, load_bench_config, parser, write_results  # noqa: E402

# Toy size: every arm, attack and evaluation runs, in minutes on a CPU; the numbers mean nothing.
# tau 0: the random tiny editor's edits pass integrity, so the AOT-attacker column gets rows.
TOY = [
    "source.num_scenes=16",
    "source.shard_size=16",
    "source.question_types=[relative_position]",
    "source.question_weights=[1.0]",
    "coevolution.heldout_scenes=12",
    "coevolution.iterations=1",
    "coevolution.warmup_scenes=16",
    "models.defender=perception-baseline",  # Stage 2's, as in the evidence preset
    "defender.model={backend: tiny, seed: 0, min_pixels: 1024, max_pixels: 4096}",
    "defender.warmup.steps=2",
    "defender.warmup.batch_prompts=8",
    "defender.rl.steps=1",
    "defender.rl.batch_prompts=2",
    "attacker.model={backend: tiny, seed: 0, resolution: 32, cfg_scale: 1.0}",
    "attacker.cold_start_scenes=0",  # the AOT-SFT rows: a fresh pool is minutes of implanting on a CPU
    "attacker.cold_start.steps=1",
    "attacker.cold_start.sft_batch=2",
    "attacker.rl.steps=2",
    "attacker.rl.groups_per_step=1",
    "attacker.rl.flow_grpo.group_size=4",
    "attacker.rl.flow_grpo.sampling_steps=3",
    "attacker.rl.reward.queries=2",
    "attacker.rl.reward.tau=0.0",
    "attacker.curriculum.sampling_steps=3",
    "attacker.curriculum.max_items=4",
    "attacker.curriculum.min_rows=8",
]


def report(result: dict, info: dict, out: str, name: str) -> None:
    """Print the evidence table, the curve and the goals; write the JSON and the curve plot."""
    from experiments.evidence import plot_curve, table_markdown

    print("\n" + table_markdown(result))
    cols = [
        "seed",
        "iteration",
        "attacker_reward_first",
        "attacker_reward_last",
        "attack_success_start",
        "attack_success_before",
        "attack_success_after",
        "defender_clean_accuracy",
        "defender_attacked_accuracy",
        "curriculum_kept",
        "curriculum_moved",
    ]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in result["curve"]:
        print(
            "| " + " | ".join(f"{r.get(c):.3f}" if isinstance(r.get(c), float) else str(r.get(c)) for c in cols) + " |"
        )
    lured = [c for c in result["columns"] if any(r.get(f"{c}_lured") is not None for r in result["arms"])]
    if lured:  # what the wrong answers read: the colour the attack added, or something else
        print("\nanswers naming a colour the attack added (share of attacked rows):")
        print("| seed | arm | " + " | ".join(lured) + " |\n|" + "---|" * (len(lured) + 2))
        for r in result["arms"]:
            cells = ["—" if r.get(f"{c}_lured") is None else f"{r[f'{c}_lured']:.3f}" for c in lured]
            print(f"| {r['seed']} | {r['arm']} | " + " | ".join(cells) + " |")
    print("\ngoals:", result["goals"])
    print(f"wall {info['wall_seconds']} s on {info['card']}")
    os.makedirs(out, exist_ok=True)
    write_results(
        out,
        name,
        info,
        [
            {
                "table": result["summary"],
                "goals": result["goals"],
                "arms": result["arms"],
                "curve": result["curve"],
                "runs": result["runs"],
                "columns": result["columns"],
                "evidence": result["config"]["evidence"],
                "seeds": result.get("seeds", []),
                "pipeline": result["config"]["pipeline"],
            }
        ],
    )
    plot_curve(result["curve"], os.path.join(out, name.replace("aot_evidence", "aot_evidence_curve") + ".png"))


def merge(paths: list[str], out: str, name: str = "aot_evidence") -> dict:
    """Combine the JSONs of runs that each did some seeds of one config (e.g. one process per
    seed sharing a GPU) into one table."""
    import json

    from experiments.evidence import EvidenceConfig, combine

    runs = [json.loads(Path(p).read_text()) for p in paths]
    first = runs[0]["results"][0]
    if any(r["results"][0]["pipeline"] != first["pipeline"] for r in runs):
        raise ValueError("the runs to merge used different pipeline configs: only seeds may differ")
    seeds = [s for r in runs for s in r["results"][0]["seeds"]]
    ecfg = EvidenceConfig(**{**first["evidence"], "seeds": [s["arms"][0]["seed"] for s in seeds]})
    result = combine(seeds, ecfg, first["pipeline"]) | {"seeds": seeds}
    info = runs[0]["info"] | {"merged": paths, "wall_seconds": [r["info"]["wall_seconds"] for r in runs]}
    report(result, info, out, name)
    return result


def main(argv: list[str] | None = None) -> dict:
    ap = parser(__doc__.splitlines()[0])
    ap.add_argument("--root", default=None, help="store root (default: ./aot-evidence, or ./aot-evidence-tiny)")
    add_config_args(ap)
    ap.add_argument("--seeds", type=int, nargs="+", default=None)
    ap.add_argument("--attacks", nargs="+", default=None, help="registered attack names (evaluation/attacks.py)")
    ap.add_argument("--unseen", nargs="+", default=None, help="which of --attacks no training arm uses")
    ap.add_argument("--name", default=None, help="result file name (default: aot_evidence[_tiny])")
    ap.add_argument(
        "--merge", nargs="+", metavar="JSON", help="combine finished runs' JSONs (same config, other seeds)"
    )
    args = ap.parse_args(argv)
    if args.merge:
        return merge(args.merge, args.out, args.name or "aot_evidence")

    from experiments.evidence import EvidenceConfig, resolve_attacks, run_evidence
    from storage import ShardStore

    preset, overrides, cfg = load_bench_config(args, TOY)
    ecfg = EvidenceConfig()
    for key in ("seeds", "attacks", "unseen"):
        if getattr(args, key) is not None:
            setattr(ecfg, key, getattr(args, key))
    ecfg = resolve_attacks(ecfg, cfg)  # the world's held-out families, stored with each seed for --merge
    root = args.root or ("./aot-evidence-tiny" if args.tiny else "./aot-evidence")
    name = args.name or ("aot_evidence_tiny" if args.tiny else "aot_evidence")
    info = environment(preset=preset, overrides=overrides, root=root)
    t0 = time.perf_counter()
    done: list[dict] = []

    def on_seed(rows: dict) -> None:  # a killed run still leaves its finished seeds
        done.append(rows)
        write_results(
            args.out,
            name,
            info | {"wall_seconds": round(time.perf_counter() - t0, 1)},
            [{"partial": True, "seeds": done, "evidence": dataclasses.asdict(ecfg), "pipeline": cfg.to_dict()}],
        )

    result = run_evidence(
        ShardStore(root),
        cfg,
        ecfg,
        on_seed=on_seed,
        say=lambda m: print(f"{time.perf_counter() - t0:7.1f}s {m}", flush=True),
    )
    result["seeds"] = done
    report(result, info | {"wall_seconds": round(time.perf_counter() - t0, 1)}, args.out, name)
    return result


if __name__ == "__main__":
    main()
