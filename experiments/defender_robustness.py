"""Can the defender phase repair a fixed attack? DAPO on attacked training items, by steps and rate.

    python experiments/defender_robustness.py                                   # evidence preset, on its device
    python experiments/defender_robustness.py --set defender.model.device=cpu --steps 15,60 --lrs 1e-4
    python experiments/defender_robustness.py --tiny                            # CPU smoke run

The co-evolution loop's defender phase (15 DAPO steps on 48 attacked + 48 clean rows in the
`evidence` preset) leaves the defender as open to its attacker as before (RESULTS.md, evidence run
3). Before that phase is lengthened, this measures what DAPO alone can do against one *fixed*,
exactly drawn attack family (``--train-attack``, a registered attack: the Stage 2 implanter, a
probe family of experiments/defender_vulnerability.py, ...): from defender 0, for each number of
steps and learning rate, DAPO on the training items with their clean and attacked images (the
curriculum's two kinds of row) against the same DAPO on the clean items only — the evidence
experiment's two arms with the attacker replaced by an oracle. Every defender is scored held out:
clean, and under every ``--eval-attacks`` family (the training family on unseen scenes, and the
others: does robustness transfer?). Greedy answers, the product's evaluator. Writes
``OUT/<name>.json``; every model and dataset is a version under ``--root``, so a rerun continues.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.common import add_config_args, environment, loop_start, parser, write_results  # noqa: E402

# importing it registers the probe families; its toy size, with DAPO batches to match
from experiments.defender_vulnerability import TINY as PROBE_TINY  # noqa: E402

TINY = [*PROBE_TINY, "defender.rl.batch_prompts=4"]


def with_rl(cfg, steps: int, lr: float):
    """``cfg`` with the defender's DAPO phase set to ``steps`` at ``lr`` (its version ids follow)."""
    d = cfg.defender
    return dataclasses.replace(cfg, defender=dataclasses.replace(d, rl=dataclasses.replace(d.rl, steps=steps, lr=lr)))


def main(argv: list[str] | None = None) -> list[dict]:
    ap = parser(__doc__.splitlines()[0])
    add_config_args(ap)
    ap.add_argument("--root", default=None, help="store root (default: ./aot-defender-robustness[-tiny])")
    ap.add_argument("--name", default="defender_robustness")
    ap.add_argument("--train-attack", default="beside-1", help="the attack family the attacked arm trains on")
    ap.add_argument(
        "--eval-attacks",
        default="",
        help="comma-separated families scored held out (default: the training family, implanter, option-decoys, "
        "backdrop-tint)",
    )
    ap.add_argument("--steps", default="15,60,150", help="DAPO steps per setting (the evidence preset's phase: 15)")
    ap.add_argument("--lrs", default="1e-4,3e-4", help="DAPO learning rates (the evidence preset's: 1e-4)")
    args = ap.parse_args(argv)

    from stages.attack import attack_version
    from stages.steps import LocalSteps

    t0 = time.perf_counter()
    preset, overrides, cfg, steps, say, start = loop_start(args, TINY, "./aot-defender-robustness")
    items, heldout, defender0 = start["items"], start["heldout"], start["defender_0"]
    store = steps.store
    train = attack_version(store, cfg, items, args.train_attack)
    say(f"training items attacked by {args.train_attack}: {train.rows} of {train.rows_in} (the rest: no such edit)")
    families = [f for f in args.eval_attacks.split(",") if f] or list(
        dict.fromkeys([args.train_attack, "implanter", "option-decoys", "backdrop-tint"])
    )
    attacked = {f: attack_version(store, cfg, heldout, f).version for f in families}

    def score(defender: str) -> dict:
        row = {"clean": steps.evaluate(defender, heldout).get("clean_accuracy")}
        for f, version in attacked.items():
            s = steps.evaluate(defender, version)
            row[f], row[f"{f}_n"] = s.get("adversarial_accuracy"), s.get("adversarial_n", 0)
        return row

    info = environment(
        preset=preset,
        overrides=overrides,
        train_attack=args.train_attack,
        train_rows=train.rows,
        items=items,
        heldout=heldout,
        defender_0=defender0,
    )
    rows = [{"arm": "base", "steps": 0, "lr": 0.0, "defender": defender0, **score(defender0)}]
    for lr in [float(x) for x in args.lrs.split(",")]:
        for n in [int(x) for x in args.steps.split(",")]:
            run = LocalSteps(store, with_rl(cfg, n, lr), say)
            for arm, data, images in (("clean-only", items, "clean"), ("attacked", train.version, "both")):
                t = time.perf_counter()
                d = run.train_defender(data, defender0, "dapo", images)
                seconds = round(time.perf_counter() - t, 1)  # training only (0 when found in the store)
                rows.append({"arm": arm, "steps": n, "lr": lr, "defender": d, "seconds": seconds, **score(d)})
                say(f"{arm} {n} steps lr {lr:g}: " + ", ".join(f"{f} {rows[-1][f]:.3f}" for f in ["clean", *families]))
                write_results(args.out, args.name, info | {"seconds": round(time.perf_counter() - t0, 1)}, rows)
    cols = ["clean", *families]
    print(f"\n{'arm':<11} {'steps':>5} {'lr':>7} " + " ".join(f"{c[:13]:>13}" for c in cols))
    for r in rows:
        print(
            f"{r['arm']:<11} {r['steps']:>5} {r['lr']:>7.0e} " + " ".join(f"{100 * (r[c] or 0):>13.1f}" for c in cols)
        )
    print(json.dumps({c: rows[0][f"{c}_n"] for c in families}))
    return rows


if __name__ == "__main__":
    main()
