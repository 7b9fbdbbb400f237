"""Does one attacker phase (Flow-GRPO against a frozen defender) raise attack success? (issue 8)

    python benchmarks/attacker_learnability.py --try "" --try "attacker.rl.lr=3e-3,attacker.rl.steps=40"
    python benchmarks/attacker_learnability.py --tiny                        # CPU smoke run

The first attacker phase of the co-evolution run, alone: the preset's data, defender 0 (its
warm-up) and the attacker's cold start, then per ``--try`` (comma-separated ``attacker.rl.*``
overrides; "" is the preset itself) Flow-GRPO from the cold start against defender 0. Each
attacker — the cold start once, then every trained one — edits the same held-out items with the
same seeds and is scored by the same defender under the preset's gate (the curriculum stage), so
cold start -> trained is the phase's effect: attack success (kept edits that fool defender 0 at
least once), its lift over the same items unedited (success the defender gives away anyway does not
count) and flips (right when clean, wrong when edited), integrity rate, mean efficacy of kept edits; and the training reward of the first
and last quarter of steps (different items per step). Every step is a version under ``--root``: a
rerun with new tries reuses the data, the defender and the cold start. Writes ``OUT/<name>.json``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.aot_evidence import TOY  # noqa: E402
from benchmarks.common import add_config_args, environment, load_bench_config, parser, write_results  # noqa: E402


def main(argv: list[str] | None = None) -> list[dict]:
    ap = parser(__doc__.splitlines()[0])
    add_config_args(ap, "override for every attacker (and the data, defender and cold start)")
    ap.add_argument("--try", dest="tries", action="append", default=None, metavar="K=V,K=V",
                    help="one attacker phase's attacker.rl overrides (repeatable; default: the preset's)")
    ap.add_argument("--root", default=None, help="store root (default: ./aot-attacker-learnability[-tiny])")
    ap.add_argument("--name", default="attacker_learnability")
    args = ap.parse_args(argv)

    from stages.config import load_config
    from storage import ShardStore
    from training.coevolution import LocalSteps

    preset, overrides, cfg = load_bench_config(args, TOY)
    tries = args.tries if args.tries is not None else [""]
    bad = [kv for t in tries for kv in filter(None, t.split(",")) if not kv.strip().startswith("attacker.rl.")]
    if bad:  # anything else would change the cold start or the scoring the tries are compared under
        raise SystemExit(f"--try takes attacker.rl.* overrides only, not {bad}; use --set for the rest")
    store = ShardStore(args.root or ("./aot-attacker-learnability" + ("-tiny" if args.tiny else "")))
    t0 = time.perf_counter()
    say = lambda m: print(f"{time.perf_counter() - t0:7.1f}s {m}", flush=True)  # noqa: E731
    steps = LocalSteps(store, cfg, say)
    data = steps.bootstrap(None)
    heldout = steps.heldout()
    defender = steps.train_defender(steps.warmup_pool() if cfg.coevolution.warmup_scenes else data["export"], None,
                                    "sft", "clean")
    cold = steps.train_attacker(data["export"], None, None, "sft")
    info = environment(preset=preset, overrides=overrides, defender=defender, cold_start=cold)

    def scored(attacker: str) -> dict:  # the held-out items, edited and scored by the base config's curriculum
        s = steps.curriculum(attacker, heldout, defender)
        return {"attack_success": s["attack_success_rate"], "clean_failure": s["clean_failure_rate"],
                "lift": s["attack_lift"], "flips": s["flip_rate"], "integrity": s["integrity_rate"],
                "mean_efficacy": s["mean_efficacy"], "items": s["items"]}

    rows = [{"try": "cold start", "attacker": cold, **scored(cold)}]
    for t in tries:
        started = time.perf_counter()
        tcfg = load_config(preset, overrides + [kv for kv in t.split(",") if kv.strip()])
        attacker = LocalSteps(store, tcfg, say).train_attacker(data["filter"], defender, cold, "grpo")
        rewards = store.read(store.manifest(attacker))["reward"].to_list()
        q = max(1, len(rewards) // 4)
        rows.append({"try": t or "preset", "attacker": attacker, **scored(attacker), "steps": len(rewards),
                     "train_reward_first": sum(rewards[:q]) / q, "train_reward_last": sum(rewards[-q:]) / q,
                     "seconds": round(time.perf_counter() - started, 1)})
        rows[-1]["success_gain"] = rows[-1]["attack_success"] - rows[0]["attack_success"]
        write_results(args.out, args.name, info | {"wall_seconds": round(time.perf_counter() - t0, 1)}, rows)
    print(f"\n{'attacker':<48} {'success':>8} {'gain':>7} {'lift':>7} {'flips':>6} {'integrity':>9} {'efficacy':>8} "
          f"{'reward 1st->last q':>19}")
    for r in rows:
        rew = f"{r['train_reward_first']:.3f} -> {r['train_reward_last']:.3f}" if "steps" in r else ""
        print(f"{r['try'][:48]:<48} {r['attack_success']:>8.3f} {r.get('success_gain', 0.0):>+7.3f} {r['lift']:>+7.3f} "
              f"{r['flips']:>6.3f} {r['integrity']:>9.3f} {r['mean_efficacy']:>8.3f} {rew:>19}")
    return rows


if __name__ == "__main__":
    main()
