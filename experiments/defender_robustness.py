"""Can the defender phase repair a fixed attack? DAPO on attacked training items, by steps and rate.

    python experiments/defender_robustness.py                                   # evidence preset, on its device
    python experiments/defender_robustness.py --set defender.model.device=cpu --steps 15,60 --lrs 1e-4
    python experiments/defender_robustness.py --sft-steps 400 --steps 60 --lrs 3e-4 --seed 1
    python experiments/defender_robustness.py --steps 60 --lrs 1e-4 --sft-weights 0,0.5     # DAPO with/without SFT term
    python experiments/defender_robustness.py --tiny                            # CPU smoke run

The co-evolution loop's defender phase (then 15 DAPO steps on 48 attacked + 48 clean rows in the
`evidence` preset) leaves the defender as open to its attacker as before (RESULTS.md, evidence run
3). Before that phase is lengthened, this measures what DAPO alone can do against one *fixed*,
exactly drawn attack family (``--train-attack``, a registered attack: the Stage 2 implanter, a
probe family of experiments/defender_vulnerability.py, ...): from defender 0, for each number of
steps and learning rate, DAPO on the training items with their clean and attacked images (the
curriculum's two kinds of row) against the same DAPO on the clean items only — the evidence
experiment's two arms with the attacker replaced by an oracle. Every defender is scored held out:
clean, and under every ``--eval-attacks`` family (the training family on unseen scenes, and the
others: does robustness transfer?). With ``--sft-steps``, an upper bound first: supervised
training (defender.warmup's schedule, no early stop) from defender 0 on the warm-up pool's fresh
scenes with their clean and attacked images against the same on the clean scenes only — if even
labelled attacked images teach this defender nothing that carries to unseen scenes, no reward
will. Every table starts with the ``no-binding`` reference: what a defender that sees colours but
ties no shape name to them scores by answering a colour in view at random (exact, from the scenes),
and splits clean accuracy by one or several objects in view. Greedy answers, the product's
evaluator. Writes
``OUT/<name>.json``; every model and dataset is a version under ``--root``, so a rerun continues.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.common import (  # noqa: E402
    accuracy_by_crowding,
    add_config_args,
    colours_in_view,
    environment,
    loop_start,
    no_binding_accuracy,
    no_binding_reference,
    parser,
    write_results,
)

# importing it registers the probe families; its toy size, with DAPO batches to match
from experiments.defender_vulnerability import TINY as PROBE_TINY  # noqa: E402

TINY = [*PROBE_TINY, "defender.rl.batch_prompts=4"]


def with_rl(cfg, steps: int, lr: float, sft_weight: float | None = None):
    """``cfg`` with the defender's DAPO phase set to ``steps`` at ``lr`` and, when given, its
    supervised term's weight (defender.rl.sft_weight); its version ids follow."""
    d = cfg.defender
    rl = dataclasses.replace(d.rl, steps=steps, lr=lr)
    if sft_weight is not None:
        rl = dataclasses.replace(rl, sft_weight=sft_weight)
    return dataclasses.replace(cfg, defender=dataclasses.replace(d, rl=rl))


def with_sft(cfg, steps: int, lr: float):
    """``cfg`` with defender.warmup (SFT mode) run for exactly ``steps`` at peak ``lr``: no held-back
    early stop (defender 0 already passed that target)."""
    d = cfg.defender
    w = dataclasses.replace(d.warmup, steps=steps, lr=lr, target_accuracy=0.0)
    return dataclasses.replace(cfg, defender=dataclasses.replace(d, warmup=w))


def seed_overrides(seed: int) -> list[str]:
    """The defender's model init, data order and sampling seeds (experiments/evidence.py's ``seeded``)."""
    return [f"defender.model.seed={seed}", f"defender.warmup.seed={seed}", f"defender.rl.seed={seed}"]


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
    ap.add_argument("--steps", default="15,60,150", help="DAPO steps per setting (the evidence preset's phase: 60)")
    ap.add_argument("--lrs", default="1e-4,3e-4", help="DAPO learning rates (the evidence preset's: 1e-4)")
    ap.add_argument(
        "--sft-steps",
        default="",
        help="comma-separated supervised steps on the warm-up pool, clean vs clean + attacked (default: none)",
    )
    ap.add_argument(
        "--sft-weights",
        default="",
        help="comma-separated defender.rl.sft_weight values for the DAPO arms, each a pair of arms (default: the "
        "config's alone); a weight w > 0 labels its arms clean-only+sft<w> and attacked+sft<w>",
    )
    ap.add_argument("--sft-lr", type=float, default=1e-3, help="their peak rate (defender.warmup's in the preset)")
    ap.add_argument("--seed", type=int, default=0, help="defender seed (init, data order, sampling); data fixed")
    args = ap.parse_args(argv)
    if args.seed:
        args.overrides = [*seed_overrides(args.seed), *args.overrides]

    from stages.attack import attack_version
    from stages.defender import evaluate_defender_version
    from stages.steps import LocalSteps
    from world import COLOURS

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

    # Held-out clean accuracy split by how many objects the image shows (a scene also holds those
    # outside the frame): with one, the question needs no binding of the named shape to its
    # colour; with several it does, and a decoy beside the target asks exactly that.
    in_view = {
        r["id"]: colours_in_view(r["scene"])
        for r in store.read(store.manifest(heldout)).select("id", "scene").iter_rows(named=True)
    }
    crowded, reference = no_binding_reference(in_view)

    def score(defender: str) -> dict:
        row = {"clean": steps.evaluate(defender, heldout).get("clean_accuracy")}
        answers = store.read(evaluate_defender_version(store, cfg, defender, heldout))
        row |= accuracy_by_crowding(answers["id"].to_list(), answers["correct"].to_list(), crowded)
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
    # The reference a defender that sees colours but binds no name to a shape would score: it
    # answers one of the colours in view at random, the decoys' included — those an attack names in
    # its rows' meta ("<colour> <shape>"; exact for the oracle families, not for a learned editor
    # that repaints the scene).
    for f, version in attacked.items():
        decoys = {
            r["id"]: json.loads(r["meta"]).get("distractors", [])
            for r in store.read(store.manifest(version)).iter_rows(named=True)
        }
        named = {
            i: [w for d in ds if isinstance(d, str) for w in d.split()[:1] if w in COLOURS] for i, ds in decoys.items()
        }
        reference[f] = no_binding_accuracy(in_view[i] + named[i] for i in named)
        reference[f"{f}_n"] = len(decoys)
    rows = [
        {"arm": "no-binding", "steps": 0, "lr": 0.0, "defender": None, **reference},
        {"arm": "base", "steps": 0, "lr": 0.0, "defender": defender0, **score(defender0)},
    ]

    def fit(arm: str, n: int, lr: float, run: LocalSteps, data: str, init: str, mode: str, images: str) -> None:
        t = time.perf_counter()
        d = run.train_defender(data, init, mode, images)
        seconds = round(time.perf_counter() - t, 1)  # training only (0 when found in the store)
        rows.append({"arm": arm, "steps": n, "lr": lr, "defender": d, "seconds": seconds, **score(d)})
        say(f"{arm} {n} steps lr {lr:g}: " + ", ".join(f"{f} {rows[-1][f]:.3f}" for f in ["clean", *families]))
        write_results(
            args.out, args.name, info | {"seed": args.seed, "seconds": round(time.perf_counter() - t0, 1)}, rows
        )

    sft_steps = [int(x) for x in args.sft_steps.split(",") if x]
    if sft_steps:
        pool = attack_version(store, cfg, start["warmup"], args.train_attack)
        say(f"warm-up scenes attacked by {args.train_attack}: {pool.rows} of {pool.rows_in}")
        info["sft_rows"] = pool.rows
    for n in sft_steps:
        run = LocalSteps(store, with_sft(cfg, n, args.sft_lr), say)
        fit("sft-clean", n, args.sft_lr, run, start["warmup"], defender0, "sft", "clean")
        fit("sft-attacked", n, args.sft_lr, run, pool.version, defender0, "sft", "both")
    weights = [float(x) for x in args.sft_weights.split(",") if x] or [None]
    for w in weights:
        tag = f"+sft{w:g}" if w else ""
        for lr in [float(x) for x in args.lrs.split(",")]:
            for n in [int(x) for x in args.steps.split(",") if x]:
                run = LocalSteps(store, with_rl(cfg, n, lr, w), say)
                fit(f"clean-only{tag}", n, lr, run, items, defender0, "dapo", "clean")
                fit(f"attacked{tag}", n, lr, run, train.version, defender0, "dapo", "both")
    cols = ["clean", "clean_1obj", "clean_multi", *families]
    print(f"\n{'arm':<17} {'steps':>5} {'lr':>7} " + " ".join(f"{c[:13]:>13}" for c in cols))
    for r in rows:
        print(
            f"{r['arm']:<17} {r['steps']:>5} {r['lr']:>7.0e} " + " ".join(f"{100 * (r[c] or 0):>13.1f}" for c in cols)
        )
    print(json.dumps({c: rows[1][f"{c}_n"] for c in cols[1:]}))
    return rows


if __name__ == "__main__":
    main()
