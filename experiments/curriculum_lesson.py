"""What a curriculum teaches, read with labels instead of a reward: supervised training from defender 0.

    python experiments/curriculum_lesson.py --preset synthetic --root STORE --curricula V1 V2 ...
    python experiments/curriculum_lesson.py --preset synthetic --root STORE --curricula V1 --sft-steps 120 --sft-lr 3e-4

The evidence experiment's defender phase learns from a curriculum through DAPO, whose sampled-answer
reward moves a small defender little (RESULTS.md: 50 CPU steps moved the embedded default's clean
accuracy by one item), so its held-out columns cannot say what a curriculum's attacked images
*teach*. Labels can: from the run's defender 0, the same supervised steps (``defender.warmup``'s
schedule in SFT mode, ``--sft-steps`` at ``--sft-lr``) on each curriculum version's rows (its
clean and attacked images) and, as the reference, on the training items' clean images alone; each
defender scored held out, clean and under every evidence attack (the implanter and the held-out
families) and under each curriculum's own attacker. A curriculum whose attacked images teach a
shortcut (a crisp target in a washed-out scene, RESULTS.md) shows it as a loss against the clean
arm under the families where the shortcut misleads. The curricula must come from a run of the same
preset, seed and overrides on ``--root`` (defender 0, the items and the held-out attacks are found
there by version id, or made). Writes ``OUT/<name>.json``.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.common import add_config_args, environment, load_bench_config, parser, write_results  # noqa: E402

# The attacker fields that say how its edits are placed (training.attacker.Placement), as a Flow-GRPO
# version records them when set (stages/attacker.py); absent: off.
PLACEMENT = ("keep_targets", "keep_target_shapes", "edits_at_source_size", "change_from_reconstruction", "change_floor")


def main():
    ap = parser(__doc__.splitlines()[0])
    add_config_args(ap)
    ap.add_argument("--root", required=True, help="the store of the run whose curricula are read")
    ap.add_argument("--curricula", nargs="+", required=True, help="curriculum version ids (training curricula)")
    ap.add_argument("--seed", type=int, default=0, help="the run's seed (experiments/evidence.seeded)")
    ap.add_argument("--sft-steps", type=int, default=60)
    ap.add_argument("--sft-lr", type=float, default=1e-4)
    ap.add_argument("--sft-seed", type=int, default=None, help="the supervised arms' seed (default: --seed)")
    ap.add_argument("--name", default="curriculum_lesson")
    a = ap.parse_args()

    from experiments.evidence import EvidenceConfig, resolve_attacks, seeded
    from stages.attack import attack_version
    from stages.coevolution import loop_start
    from stages.steps import LocalSteps
    from storage import ShardStore

    preset, overrides, cfg = load_bench_config(a)
    cfg = seeded(cfg, a.seed)
    store = ShardStore(a.root)
    steps = LocalSteps(store, cfg, print)
    lin = loop_start(steps, cfg)  # found by id: the run's defender 0, items and held-out scenes
    ecfg = resolve_attacks(EvidenceConfig(), cfg)
    attacks = {name: attack_version(store, cfg, lin["heldout"], name).version for name in ecfg.attacks}
    for v in a.curricula:  # each curriculum's own attacker, its edits placed as its run placed them
        attacker = store.manifest(v).parents[0]
        off = type(cfg.attacker)()  # the fields' defaults: a version records only those set
        placed = {k: store.manifest(attacker).config["attacker"].get(k, getattr(off, k)) for k in PLACEMENT}
        c = dataclasses.replace(cfg, attacker=dataclasses.replace(cfg.attacker, **placed))
        attacks[f"attacker {v[:8]}"] = attack_version(
            store, c, lin["heldout"], "aot-attacker", version=attacker
        ).version
    d = cfg.defender
    sft_seed = a.seed if a.sft_seed is None else a.sft_seed  # init of the arms is defender 0's; order, sampling
    sft = dataclasses.replace(
        cfg,
        defender=dataclasses.replace(
            d, warmup=dataclasses.replace(d.warmup, steps=a.sft_steps, lr=a.sft_lr, target_accuracy=0.0, seed=sft_seed)
        ),
    )
    trainer = LocalSteps(store, sft, print)
    arms = {
        "defender 0": lin["defender_0"],
        "sft clean": trainer.train_defender(lin["items"], lin["defender_0"], "sft", "clean"),
    }
    for v in a.curricula:
        arms[f"sft {v[:8]}"] = trainer.train_defender(v, lin["defender_0"], "sft")
    rows = []
    for arm, defender in arms.items():
        row = {
            "arm": arm,
            "defender": defender,
            "clean": steps.evaluate(defender, lin["heldout"]).get("clean_accuracy"),
        }
        for name, version in attacks.items():
            row[name] = steps.evaluate(defender, version).get("adversarial_accuracy")
        rows.append(row)
    cols = ["clean", *attacks]
    print("\n| arm | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols))
    for r in rows:
        print(f"| {r['arm']} | " + " | ".join("" if r[c] is None else f"{100 * r[c]:.1f}" for c in cols) + " |")
    info = environment(
        preset=preset,
        overrides=overrides,
        seed=a.seed,
        sft_steps=a.sft_steps,
        sft_seed=sft_seed,
        sft_lr=a.sft_lr,
        curricula=a.curricula,
        heldout=lin["heldout"],
    )
    write_results(a.out, a.name, info, rows)


if __name__ == "__main__":
    main()
