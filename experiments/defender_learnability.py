"""Does a tiny defender learn a synthetic world's questions, and how fast? (issue 8's base arm)

    python experiments/defender_learnability.py                          # the evidence preset's defender
    python experiments/defender_learnability.py --set defender.model.hidden=512 --seconds 240 --name h512
    python experiments/defender_learnability.py --train-set "source.question_types=[colour, count]" \
        --train-set "source.question_weights=[0.5, 0.5]"                 # an auxiliary question
    python experiments/defender_learnability.py --tiny                   # CPU smoke run

Trains the preset's ``defender.model`` with its ``defender.warmup`` (supervised, the co-evolution
run's defender 0) on ``coevolution.warmup_scenes`` fresh scenes of the preset's world and scores
greedy answers on ``coevolution.heldout_scenes`` held-out scenes every ``--eval-every`` steps,
until the steps or ``--seconds`` run out. Prints accuracy against chance per evaluation and
writes ``OUT/<name>.json``. Several processes with different ``--set`` share one card for a
sweep. Chance is the mean of 1 / options over the held-out questions. ``--train-set`` changes
the training pool alone (e.g. colour and count questions, scored on colour questions).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.common import (  # noqa: E402
    accuracy_by_crowding,
    add_config_args,
    colours_in_view,
    environment,
    load_bench_config,
    no_binding_reference,
    parser,
    write_results,
)

TINY = [
    "coevolution.warmup_scenes=32",
    "coevolution.heldout_scenes=16",
    "defender.warmup.steps=4",
    "defender.warmup.batch_prompts=8",
    "defender.warmup.micro_batch=8",
    "defender.model={backend: tiny, seed: 0, min_pixels: 1024, max_pixels: 4096, rope_theta: 10.0}",
]


def main(argv: list[str] | None = None) -> list[dict]:
    ap = parser(__doc__.splitlines()[0])
    add_config_args(ap)
    ap.add_argument("--eval-every", type=int, default=250, help="optimizer steps between evaluations")
    ap.add_argument("--seconds", type=float, default=0, help="stop after the first evaluation past this wall time")
    ap.add_argument("--name", default="defender_learnability")
    ap.add_argument(
        "--train-set",
        dest="train_overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override for the training pool only (after --set), e.g. another question mix: "
        "does an auxiliary question teach what the held-out one needs?",
    )
    args = ap.parse_args(argv)

    import dataclasses

    from evaluation.answers import answer_items
    from models.qwen_vl import load_policy
    from stages.source import heldout_config, warmup_config, world_rows
    from stages.warm_defender import example_of_row, world_examples
    from training.defender import DefenderTrainer

    preset, overrides, cfg = load_bench_config(args, TINY)
    t0 = time.perf_counter()
    say = lambda m: print(f"{time.perf_counter() - t0:7.1f}s {args.name}: {m}", flush=True)  # noqa: E731
    from config import load_config

    tcfg = load_config(preset, [*overrides, *args.train_overrides]) if args.train_overrides else cfg
    train = world_examples(tcfg.coevolution.warmup_scenes, warmup_config(tcfg).source.seed, tcfg)
    test_rows = world_rows(cfg.coevolution.heldout_scenes, heldout_config(cfg).source.seed, cfg)
    test = [example_of_row(r) for r in test_rows]
    chance = sum(1.0 / e.num_options for e in test) / len(test)
    # Binding, not colour perception, is what the loop needs: with several objects in view the
    # question's shape has to be tied to its colour. The no-binding score (a colour in view at
    # random) is the bar that held-out accuracy must clear before a decoy can cost anything.
    in_view = {r["id"]: colours_in_view(r["scene"]) for r in test_rows}
    crowded, no_binding = no_binding_reference(in_view)
    say(
        f"{len(train)} training and {len(test)} held-out scenes ({no_binding['clean_multi_n']} with several "
        f"objects), chance {chance:.3f}, no-binding {no_binding['clean']:.3f} (several objects "
        f"{no_binding['clean_multi']:.3f})"
    )
    policy = load_policy(cfg.defender.model)
    params = sum(p.numel() for p in policy.model.parameters())
    # The whole curve: no early stop at the preset's target_accuracy (the held-out set is scored here).
    wcfg = dataclasses.replace(cfg.defender.warmup, mode="sft", target_accuracy=0.0)
    trainer = DefenderTrainer(policy, train, wcfg)
    info = environment(
        preset=preset,
        overrides=overrides,
        train_overrides=args.train_overrides,
        parameters=params,
        chance=chance,
        no_binding=no_binding,
        model=cfg.defender.model,
        warmup=dataclasses.asdict(wcfg),
        source=dataclasses.asdict(cfg.source),
    )
    rows: list[dict] = []
    fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731

    def evaluate() -> None:
        answers = answer_items(policy, test)
        split = accuracy_by_crowding([a["id"] for a in answers], [a["correct"] for a in answers], crowded)
        train_answers = answer_items(policy, train[: len(test)])
        losses = [m["loss"] for m in trainer.metrics[-args.eval_every :]] or [float("nan")]
        rows.append(
            {
                "step": trainer.step,
                "seconds": round(time.perf_counter() - t0, 1),
                "heldout_accuracy": sum(a["correct"] for a in answers) / len(answers),
                "heldout_1obj": split["clean_1obj"],
                "heldout_multi": split["clean_multi"],
                "train_accuracy": sum(a["correct"] for a in train_answers) / len(train_answers),
                "strict_format": sum(a["strict_format"] for a in answers) / len(answers),
                "train_loss": sum(losses) / len(losses),
                "lr": trainer.lr_at(max(0, trainer.step - 1)),
            }
        )
        r = rows[-1]
        say(
            f"step {r['step']:5d}  held-out {r['heldout_accuracy']:.3f} (chance {chance:.3f}), several objects "
            f"{fmt(r['heldout_multi'])} (no-binding {fmt(no_binding['clean_multi'])})  train "
            f"{r['train_accuracy']:.3f}  loss {r['train_loss']:.3f}  lr {r['lr']:.2e}"
        )
        write_results(args.out, args.name, info | {"wall_seconds": r["seconds"]}, rows)

    say(f"defender: {params / 1e6:.2f} M parameters on {cfg.defender.model.get('device', 'cpu')}")
    evaluate()
    while trainer.step < wcfg.steps:
        trainer.train(steps=args.eval_every)
        evaluate()
        if args.seconds and time.perf_counter() - t0 > args.seconds:
            say(f"time budget of {args.seconds:.0f} s reached at step {trainer.step}")
            break
    print("\n| step | s | held-out acc | one object | several | train acc | loss |\n|---|---|---|---|---|---|---|")
    print(
        f"| no-binding | | {no_binding['clean']:.3f} | {fmt(no_binding['clean_1obj'])} | "
        f"{fmt(no_binding['clean_multi'])} | | |"
    )
    for r in rows:
        print(
            f"| {r['step']} | {r['seconds']} | {r['heldout_accuracy']:.3f} | {fmt(r['heldout_1obj'])} | "
            f"{fmt(r['heldout_multi'])} | {r['train_accuracy']:.3f} | {r['train_loss']:.3f} |"
        )
    return rows


if __name__ == "__main__":
    main()
