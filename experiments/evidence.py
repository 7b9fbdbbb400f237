"""The evidence experiment: does co-evolution harden the defender beyond clean-data RL?

Three arms from the same starting defender, with the same number of defender updates, per seed:

- ``base``: the supervised warm-up on clean scenes (the co-evolution run's defender 0);
- ``clean-only``: base + N rounds of DAPO on the clean training items;
- ``aot``: base + N co-evolution iterations (attacker Flow-GRPO vs the frozen defender,
  curriculum, defender DAPO) — ``run_coevolution`` itself, so every stage and version is the
  product's own.

Every arm's defender is evaluated on the held-out scenes: clean, and under every attack named in
``EvidenceConfig.attacks`` (registered in evaluation/attacks.py) plus the seed's final AOT
attacker. The co-evolution curve (attacker reward within each attacker phase, attack success
before and after each defender phase, strategy mix) comes from the run's own table. Everything is
a version in the store, so a rerun after a crash continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import statistics
from dataclasses import dataclass
from typing import Callable

from config import PipelineConfig, documented
from storage import ShardStore

ARMS = ("base", "clean-only", "aot")


@dataclass
class EvidenceConfig:
    seeds: list = documented(
        [0, 1, 2],
        "Training seeds per arm (issue 8: at least 3); the data and held-out scenes are "
        "shared, the seed sets every model's init, data order and sampling.",
    )
    attacks: list = documented(
        [],
        "Defender-agnostic attacks on the held-out scenes, by registered name "
        "(evaluation/attacks.py); empty: the implanter plus the held-out family of each "
        "question type the world asks (UNSEEN_FAMILY).",
    )
    unseen: list = documented(
        [],
        "Which of ``attacks`` no training arm ever uses (reported as 'unseen'); empty: "
        "the held-out families chosen with ``attacks``.",
    )


# The attack families no training arm uses, per question type: swap-pair mirrors a relation's
# targets' attributes; option-decoys paints a colour question's wrong options beside its target, and
# backdrop-tint tints the background around it (no object added, as every training arm adds one),
# sparing the objects' boxes, or (backdrop-tint-outline) only their shapes: an attacker that keeps
# its targets (attacker.keep_targets) leaves their clean boxes in every edit, and a defender that
# learned to read that rectangle gains under backdrop-tint, not under its outline variant.
UNSEEN_FAMILY = {
    "relative_position": ["swap-pair"],
    "colour": ["option-decoys", "backdrop-tint", "backdrop-tint-outline"],
}


def resolve_attacks(ecfg: EvidenceConfig, cfg: PipelineConfig) -> EvidenceConfig:
    """``ecfg`` with its attack lists filled in for the world of ``cfg`` where they are empty."""
    if ecfg.attacks:
        return ecfg
    unseen = [f for q in cfg.source.question_types for f in UNSEEN_FAMILY.get(q, [])]
    return dataclasses.replace(ecfg, attacks=["implanter", *unseen], unseen=ecfg.unseen or unseen)


def seeded(cfg: PipelineConfig, seed: int) -> PipelineConfig:
    """The pipeline config of one seed: every trainer's and sampler's seed, nothing about the data."""
    d, a = cfg.defender, cfg.attacker
    rep = dataclasses.replace
    return rep(
        cfg,
        defender=rep(d, model={**d.model, "seed": seed}, warmup=rep(d.warmup, seed=seed), rl=rep(d.rl, seed=seed)),
        attacker=rep(
            a,
            model={**a.model, "seed": seed},
            cold_start=rep(a.cold_start, seed=seed),
            rl=rep(a.rl, seed=seed),
            curriculum=rep(a.curriculum, seed=seed),
        ),
    )


def lure_colours(meta: dict) -> set[str]:
    """The colours an attack put in front of the defender (``meta`` of an attack row): a tint, and
    every colour word of its distractors ("red cube" -> red)."""
    from world import COLOURS

    words = [meta.get("tint") or ""] + [w for d in meta.get("distractors") or [] for w in str(d).split()]
    return {w for w in words if w in COLOURS}


def lured_share(predictions: dict[str, str | None], attacked: list[dict]) -> float | None:
    """Of the attacked rows a defender answered (``predictions``: row id -> its letter, None when
    unparsed) whose attack added a colour (``lure_colours``), the share whose answer names one: what
    a wrong answer under the attack reads — the lure, or something else. None: no such row (an
    attack that adds no nameable colour, as a learned attacker's edits)."""
    import json

    hits = n = 0
    for row in attacked:
        lures = lure_colours(json.loads(row.get("meta") or "{}"))
        if row["id"] not in predictions or not lures:
            continue
        n += 1
        letter, options = predictions[row["id"]], row["options"]
        k = ord(letter) - ord("A") if letter else -1
        hits += 0 <= k < len(options) and options[k] in lures
    return hits / n if n else None


def arm_lured(store: ShardStore, cfg: PipelineConfig, defender: str, attack: str, attacked: list[dict]):
    """``lured_share`` of ``defender`` on the attack version ``attack`` (its rows ``attacked``; its
    evaluation as ``steps.evaluate`` made it: found by version id, not recomputed)."""
    from stages.defender import evaluate_defender_version

    ev = store.read(evaluate_defender_version(store, cfg, defender, attack))
    adv = ev.filter(ev["image_kind"] == "adversarial")
    return lured_share(dict(zip(adv["id"].to_list(), adv["prediction"].to_list())), attacked)


def run_seed(
    store: ShardStore, cfg: PipelineConfig, ecfg: EvidenceConfig, seed: int, say: Callable[[str], None] = print
) -> dict:
    """One seed: the AOT run, the clean-only arm, every evaluation. Returns its rows."""
    from stages.attack import attack_version
    from stages.coevolution import loop_start, run_coevolution
    from stages.steps import LocalSteps

    c = seeded(cfg, seed)
    steps = LocalSteps(store, c, lambda m: say(f"[seed {seed}] {m}"))
    # Everything that does not depend on the attacker first (run_coevolution finds it again): the
    # reference arms, the fixed attacks and their evaluations. A second configuration of the same
    # seed started once this one's cold start exists (experiments/evidence_variants_gpu.sh) then
    # finds all of it instead of training the same versions beside it.
    lin = loop_start(steps, c)
    d = lin["defender_0"]
    for _ in range(c.coevolution.iterations):  # the same number of DAPO rounds as AOT, on clean items only
        d = steps.train_defender(lin["items"], d, "dapo", "clean")
    defenders = {"base": lin["defender_0"], "clean-only": d}
    attacks = {name: attack_version(store, c, lin["heldout"], name).version for name in ecfg.attacks}
    summaries: dict = {}

    def evaluate(arm: str, data: str) -> dict:  # each (arm, data) evaluated, or found, once
        if (arm, data) not in summaries:
            summaries[arm, data] = steps.evaluate(defenders[arm], data)
        return summaries[arm, data]

    for arm in ("base", "clean-only"):
        for data in (lin["heldout"], *attacks.values()):
            evaluate(arm, data)
    run = run_coevolution(store, c, steps)
    lin, iters = run.extra["lineage"], store.read(run).to_dicts()
    defenders["aot"] = iters[-1]["defender"]
    attacks["aot-attacker"] = attack_version(
        store, c, lin["heldout"], "aot-attacker", version=iters[-1]["attacker"]
    ).version
    # each attack's rows once for every arm (what lured_share reads, not the images)
    attacked = {
        name: store.read(version).select("id", "options", "meta").to_dicts() for name, version in attacks.items()
    }
    arms = []
    for arm in ARMS:
        row = {
            "seed": seed,
            "arm": arm,
            "defender": defenders[arm],
            "clean": evaluate(arm, lin["heldout"]).get("clean_accuracy"),
        }
        for name, version in attacks.items():
            s = evaluate(arm, version)
            row[name] = s.get("adversarial_accuracy")
            row[f"{name}_clean"] = s.get("clean_accuracy")  # the same rows, unattacked
            row[f"{name}_n"] = s.get("adversarial_n", 0)
            row[f"{name}_lured"] = arm_lured(store, c, defenders[arm], version, attacked[name])
        arms.append(row)
        say(
            f"[seed {seed}] {arm}: "
            + ", ".join(f"{k} {v:.3f}" for k, v in row.items() if isinstance(v, float) and not k.endswith("_clean"))
        )
    curve = []
    for r in iters:  # the training reward too (first and last quarter of steps; different items per step)
        rewards = store.read(store.manifest(r["attacker"]))["reward"].to_list()
        q = max(1, len(rewards) // 4)
        curve.append(
            {
                "seed": seed,
                **{k: v for k, v in r.items() if not isinstance(v, str)},
                "attacker_reward_first": sum(rewards[:q]) / q,
                "attacker_reward_last": sum(rewards[-q:]) / q,
            }
        )
    return {"arms": arms, "curve": curve, "run": run.version}


def summarize(arms: list[dict], columns: list[str]) -> list[dict]:
    """Mean and spread (sample standard deviation; 0 for one seed) of each column per arm."""
    out = []
    for arm in ARMS:
        rows = [r for r in arms if r["arm"] == arm]
        rec = {"arm": arm, "seeds": len(rows)}
        for col in columns:
            vals = [r[col] for r in rows if r.get(col) is not None]
            rec[col] = statistics.fmean(vals) if vals else None
            rec[f"{col}_sd"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        out.append(rec)
    return out


# Issue 21's thresholds (AOT minus clean-only, accuracy as a fraction): what co-evolution must buy
# under the implanter and under its own final attacker, under every family no arm trains on, and
# what it may cost clean; and per seed, the share of phases in which the curve must move.
GAIN_GOALS = {"implanter": 0.10, "aot-attacker": 0.10}
UNSEEN_GAIN_GOAL = 0.05
CLEAN_TOLERANCE = 0.02
PHASE_SHARE = 2 / 3


def goals(summary: list[dict], curve: list[dict], ecfg: EvidenceConfig) -> dict:
    """Issue 21's goals, each as measured: True/False (None where a number is missing)."""
    by = {s["arm"]: s for s in summary}
    aot, clean = by["aot"], by["clean-only"]

    def gap(col):
        return None if aot.get(col) is None or clean.get(col) is None else aot[col] - clean[col]

    def at_least(col, bar):
        return None if gap(col) is None else gap(col) >= bar - 1e-12

    out = {f"{name}_gain": gap(name) for name in ["clean", *ecfg.attacks, "aot-attacker"]}
    for name, bar in GAIN_GOALS.items():
        out[f"{name}_goal"] = at_least(name, bar)
    for name in ecfg.unseen:
        out[f"{name}_goal"] = at_least(name, UNSEEN_GAIN_GOAL)
    out["clean_goal"] = None if gap("clean") is None else abs(gap("clean")) <= CLEAN_TOLERANCE + 1e-12

    # on the same held-out items against the same frozen defender (the training batches' rewards
    # differ in items from step to step, so their first and last steps are not comparable)
    def moves(rows):  # (rises within each measurable attacker phase, falls after each defender phase)
        up = [
            r["attack_success_before"] > r["attack_success_start"]
            for r in rows
            if r.get("attack_success_start") is not None
        ]
        return up, [r["attack_success_after"] < r["attack_success_before"] for r in rows]

    up, down = moves(curve)
    out["attacker_rises_within_phase"], out["attack_falls_after_defender"] = sum(up), sum(down)
    out["phases"] = len(curve)
    per_seed = []
    for seed in sorted({r.get("seed", 0) for r in curve}):
        up, down = moves([r for r in curve if r.get("seed", 0) == seed])
        per_seed.append(
            bool(up) and sum(up) >= PHASE_SHARE * len(up) - 1e-9 and sum(down) >= PHASE_SHARE * len(down) - 1e-9
        )
    out["curve_goal_per_seed"] = per_seed
    out["curve_goal"] = bool(per_seed) and all(per_seed)
    return out


def run_evidence(
    store: ShardStore,
    cfg: PipelineConfig,
    ecfg: EvidenceConfig | None = None,
    say: Callable[[str], None] = print,
    on_seed: Callable[[dict], None] | None = None,
) -> dict:
    """Every seed (``on_seed`` gets each one's rows as it finishes), then ``combine``."""
    ecfg = resolve_attacks(ecfg or EvidenceConfig(), cfg)
    unknown = [u for u in ecfg.unseen if u not in ecfg.attacks]
    if unknown:
        raise ValueError(f"evidence.unseen names {unknown}, which are not in evidence.attacks {ecfg.attacks}")
    seeds = []
    for s in ecfg.seeds:
        seeds.append(run_seed(store, cfg, ecfg, s, say))
        if on_seed:
            on_seed(seeds[-1])
    return combine(seeds, ecfg, cfg.to_dict())


def combine(seeds: list[dict], ecfg: EvidenceConfig, pipeline: dict) -> dict:
    """Seeds' rows (from one run, or several runs of the same config) -> the summary table
    (arms x columns, mean and spread) and the goals."""
    arms = [r for s in seeds for r in s["arms"]]
    curve = [r for s in seeds for r in s["curve"]]
    columns = ["clean", *ecfg.attacks, "aot-attacker"]
    summary = summarize(arms, columns)
    return {
        "config": {"evidence": dataclasses.asdict(ecfg), "pipeline": pipeline},
        "columns": columns,
        "arms": arms,
        "curve": curve,
        "summary": summary,
        "goals": goals(summary, curve, ecfg),
        "runs": [s["run"] for s in seeds],
    }


def plot_curve(curve: list[dict], path: str) -> None:
    """The co-evolution curve, mean over seeds: attack success on the held-out items at the start
    and end of each attacker phase (against defender n-1) and before and after each defender phase."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from stages.coevolution import accuracy_panel

    its = sorted({r["iteration"] for r in curve})

    def mean(key, n):
        vals = [r[key] for r in curve if r["iteration"] == n and r.get(key) is not None]
        return statistics.fmean(vals) if vals else float("nan")

    fig, (a, b, c) = plt.subplots(1, 3, figsize=(11, 3))
    for n in its:  # one segment per attacker phase: does attack success rise within it?
        a.plot(
            [n - 0.3, n + 0.3], [mean("attack_success_start", n), mean("attack_success_before", n)], "o-", color="C3"
        )
    a.set_title("attack success (attacker n-1 -> n)")
    a.set_xlabel("iteration")
    for n in its:  # one segment per defender phase: does attack success fall after it?
        b.plot(
            [n - 0.3, n + 0.3], [mean("attack_success_before", n), mean("attack_success_after", n)], "s-", color="C0"
        )
    b.set_title("attack success (vs defender n-1 -> n)")
    b.set_xlabel("iteration")
    accuracy_panel(
        c, its, [mean("defender_clean_accuracy", n) for n in its], [mean("defender_attacked_accuracy", n) for n in its]
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def table_markdown(result: dict) -> str:
    """The evidence table: arms x {clean, each attack}, mean ± spread over seeds."""
    cols = result["columns"]
    unseen = set(result["config"]["evidence"]["unseen"])
    head = ["arm", "seeds"] + [f"{c} (unseen)" if c in unseen else c for c in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in result["summary"]:
        cells = [s["arm"], str(s["seeds"])] + [
            "—" if s[c] is None else f"{100 * s[c]:.1f} ± {100 * s[f'{c}_sd']:.1f}" for c in cols
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
