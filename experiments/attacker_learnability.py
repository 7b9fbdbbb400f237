"""Does one attacker phase (Flow-GRPO against a frozen defender) raise attack success?

    python experiments/attacker_learnability.py --try "" --try "attacker.rl.lr=3e-3,attacker.rl.steps=40"
    python experiments/attacker_learnability.py --try "attacker.cold_start.steps=200" --score-noise 1.0
    python experiments/attacker_learnability.py --try "attacker.cold_start_scenes=1024,attacker.rl.steps=0"
    python experiments/attacker_learnability.py --tiny                        # CPU smoke run

The first attacker phase of the co-evolution run, alone: the preset's data, defender 0 (its
warm-up) and the attacker's cold start, then per ``--try`` (comma-separated ``attacker.rl.*``
overrides; "" is the preset itself) Flow-GRPO from the cold start against defender 0. Each
attacker — the cold start once, then every trained one — edits the same held-out items with the
same seeds and is scored by the same defender under the preset's gate (the curriculum stage), so
cold start -> trained is the phase's effect (``lift_gain``), and the oracle implanter (Stage 2's
verified distractor, no defender in the loop) on the same items is the first row, the lift a
cold start is read against: attack success (kept edits that fool defender 0 at
least once), its lift over the same items unedited (success the defender gives away anyway does
not count) and flips (right when clean, wrong when edited), integrity rate, mean efficacy of kept
edits; and the training reward of the first and last quarter of steps (different items per step).
A try with ``attacker.cold_start*`` overrides (``cold_start.*``, ``cold_start_scenes``,
``cold_start_named``) starts from its own cold start (scored as its
baseline row; ``attacker.rl.steps=0`` scores only that). ``--score-noise A`` scores every attacker
a second time with SDE edits of noise A (the sampler it is trained with; the curriculum's default
is the ODE): ``sde_*`` columns. Every step is a version under ``--root``: a rerun with new tries
reuses the data, the defender and the cold start. Writes ``OUT/<name>.json``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.aot_evidence import TOY  # noqa: E402
from experiments.common import add_config_args, environment, load_bench_config, parser, write_results  # noqa: E402

# Columns of a scored attacker <- the curriculum summary's keys (stages/curriculum.attack_summary)
SCORES = {
    "attack_success": "attack_success_rate",
    "clean_failure": "clean_failure_rate",
    "lift": "attack_lift",
    "flips": "flip_rate",
    "integrity": "integrity_rate",
    "mean_efficacy": "mean_efficacy",
    "items": "items",
}


def dense_drop(dense, cleans, editeds, items, n: int) -> dict:
    """The defender's probability of the right letter, clean minus edited, on the kept edits:
    summed over all ``n`` items attacked (an edit that fails integrity adds 0), and over the kept
    ones. One scoring forward per image, no sampling: the same effect the sampled lift reads,
    without its +/-0.07 of answer noise on 96 items."""
    if not items:
        return {"dense_drop": 0.0, "dense_drop_kept": 0.0}
    drop = [c - e for c, e in zip(dense.right_probability(cleans, items), dense.right_probability(editeds, items))]
    return {"dense_drop": sum(drop) / max(1, n), "dense_drop_kept": sum(drop) / len(drop)}


def training_signal(store, attacker: str) -> dict:
    """What the Flow-GRPO phase's groups held (its samples.parquet): the share of broken edits, the
    valid edits' dense efficacy in the first and last quarter of steps, and how much of a group's
    reward spread the valid edits' efficacy carries. GRPO can only sharpen variation the sampler
    produces: a group whose valid edits all fool the defender alike gives it nothing to rank."""
    import io

    import polars as pl

    raw = store.read_file(store.manifest(attacker), "samples.parquet")
    df = pl.read_parquet(io.BytesIO(raw)) if raw else None
    if df is None or "aot/integrity" not in df.columns:
        return {}
    last = df["step"].max()
    q = max(1, last // 4)
    quarter = {"first": df.filter(pl.col("step") <= q), "last": df.filter(pl.col("step") > last - q)}
    groups = df.group_by("step", "item").agg(
        pl.col("reward").fill_nan(None).std().alias("reward_sd"),
        pl.col("aot/efficacy").filter(pl.col("aot/integrity") > 0).std().alias("valid_sd"),
        (pl.col("aot/integrity") == 0).mean().alias("broken"),
    )
    out = {
        "group_reward_sd": groups["reward_sd"].mean(),
        "group_valid_efficacy_sd": groups["valid_sd"].mean(),
        "groups_with_broken": float((groups["broken"] > 0).mean()),
    }
    for name, part in quarter.items():
        valid = part.filter(pl.col("aot/integrity") > 0)
        out[f"train_integrity_{name}"] = float(part["aot/integrity"].mean())
        out[f"train_valid_efficacy_{name}"] = float(valid["aot/efficacy"].mean()) if valid.height else None
    return out


def implanter_descriptions(store, cfg, heldout: str) -> dict[str, str]:
    """Held-out item id -> the oracle implanter's distractor for it ("a red cube"): what a named
    instruction asks the attacker to add (the cold start's named pairs are worded the same way)."""
    import json

    from stages.attack import attack_version

    rows = store.read(attack_version(store, cfg, heldout, "implanter")).iter_rows(named=True)
    return {
        r["id"]: found[0] for r in rows if (found := json.loads(r.get("meta") or "{}").get("distractors") or [None])[0]
    }


def score_edits(sampled, dense, items: list, edits: list, n: int) -> dict:
    """Edits of ``items`` scored as the curriculum scores an attacker's (one edit per call: the
    gate, K sampled answers, those items' unedited images as the baseline), plus the dense drop;
    rates over ``n`` items attacked."""
    from stages.curriculum import attack_summary

    scores = [sampled([it.image], [e], [it])[0] for it, e in zip(items, edits)]
    kept = [(it, e, sc) for it, e, sc in zip(items, edits, scores) if sc["integrity"]]
    clean = sampled.unedited_efficacy([it.image for it, _, _ in kept], [it for it, _, _ in kept])
    summary = attack_summary([{**sc, "clean_efficacy": ce} for (_, _, sc), ce in zip(kept, clean)], n)
    return {k: summary[v] for k, v in SCORES.items() if v in summary} | dense_drop(
        dense, [it.image for it, _, _ in kept], [e for _, e, _ in kept], [it for it, _, _ in kept], n
    )


def named_scores(cfg, editor, items: list, named: dict[str, str], sampled, dense) -> dict:
    """An attacker (``editor``) on the held-out items whose instruction names the implanter's
    distractor for that item (items without one keep theirs): ODE edits with the curriculum's
    seeds, scored by ``score_edits``. Against the plain instruction's row it separates "cannot
    draw an effective distractor" from "does not choose one": asked for nothing in particular, a
    flow model trained on pairs whose distractor colour is random can average the colours into a
    harmless one."""
    import dataclasses

    from models.editor import attack_instruction
    from stages.curriculum import edit_items
    from training.attacker import Placement, scored_item

    a, c = cfg.attacker, cfg.attacker.curriculum
    its = [
        scored_item(
            editor,
            dataclasses.replace(it, instruction=attack_instruction(it.question, it.target_names, named[it.id]))
            if it.id in named
            else it,
            a.edits_at_source_size,
        )
        for it in items
    ]
    seeds = [c.seed * 1_000_003 + n for n in range(len(its))]
    edits = edit_items(
        editor,
        its,
        seeds,
        c.sampling_steps,
        c.batch,
        None,
        0.0,
        a.rl.flow_grpo.sigma_cap,
        placement=Placement.of(a),
    )
    return {"named_" + k: v for k, v in score_edits(sampled, dense, its, edits, len(its)).items()}


def save_grid(store, curriculum: str, path: Path) -> None:
    """The curriculum's clean-over-edited grid (its first 8 kept edits) as ``path``."""
    grid = store.read_file(store.manifest(curriculum), "grid.png")
    if grid:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(grid)


def implanter_scores(store, cfg, heldout: str, sampled, dense) -> dict:
    """The oracle implanter (Stage 2's verified distractor, no defender in the loop) on the same
    held-out items, scored as the curriculum scores an attacker (``score_edits``). The row an
    attacker's lift is read against."""
    from stages.attack import attack_version
    from stages.attacker import item_from_row, items_from_version
    from storage import decode_image

    items = items_from_version(store, store.manifest(heldout), cfg.attacker.curriculum.max_items)
    wanted = {it.id for it in items}
    attacked = [
        r
        for r in store.read(attack_version(store, cfg, heldout, "implanter")).iter_rows(named=True)
        if r["id"] in wanted
    ]
    mine = [item_from_row(r, "clean_image") for r in attacked]
    edits = [decode_image(r["adversarial_image"]) for r in attacked]
    return {"try": "oracle implanter", "attacker": "implanter", "items": len(items)} | score_edits(
        sampled, dense, mine, edits, len(items)
    )


def main(argv: list[str] | None = None) -> list[dict]:
    ap = parser(__doc__.splitlines()[0])
    add_config_args(ap, "override for every attacker (and the data, defender and cold start)")
    ap.add_argument(
        "--try",
        dest="tries",
        action="append",
        default=None,
        metavar="K=V,K=V",
        help="one attacker phase's attacker.rl overrides (repeatable; default: the preset's); with "
        "attacker.cold_start.* overrides the try starts from its own cold start, scored as its "
        "own baseline row; attacker.rl.steps=0 scores that cold start alone",
    )
    ap.add_argument(
        "--score-noise",
        type=float,
        default=0.0,
        metavar="A",
        help="also score every attacker with SDE edits of noise level A (attacker.curriculum.noise_level)"
        ": sde_* columns beside the ODE ones",
    )
    ap.add_argument(
        "--named",
        action="store_true",
        help="also score every attacker with instructions that name the implanter's distractor for each "
        "held-out item (named_* columns): can it draw an effective distractor when told which one?",
    )
    ap.add_argument(
        "--grids",
        action="store_true",
        help="copy each attacker's clean-over-edited grid to OUT/<name>_<attacker version>.png",
    )
    ap.add_argument("--root", default=None, help="store root (default: ./aot-attacker-learnability[-tiny])")
    ap.add_argument("--name", default="attacker_learnability")
    args = ap.parse_args(argv)

    from config import load_config
    from stages.steps import LocalSteps
    from storage import ShardStore

    preset, overrides, cfg = load_bench_config(args, TOY)
    tries = [
        [kv.strip() for kv in t.split(",") if kv.strip()] for t in (args.tries if args.tries is not None else [""])
    ]
    bad = [kv for t in tries for kv in t if not kv.startswith(("attacker.rl.", "attacker.cold_start"))]
    if bad:  # anything else would change the scoring the tries are compared under
        raise SystemExit(
            f"--try takes attacker.rl.* and attacker.cold_start* overrides only, not {bad}; use --set for the rest"
        )
    store = ShardStore(args.root or ("./aot-attacker-learnability" + ("-tiny" if args.tiny else "")))
    t0 = time.perf_counter()
    say = lambda m: print(f"{time.perf_counter() - t0:7.1f}s {m}", flush=True)  # noqa: E731
    steps = LocalSteps(store, cfg, say)
    sde_steps = (
        LocalSteps(store, load_config(preset, overrides + [f"attacker.curriculum.noise_level={args.score_noise}"]), say)
        if args.score_noise
        else None
    )
    data = {s["stage"]: s["version"] for s in steps.bootstrap(None)}
    heldout = steps.heldout()
    defender = steps.train_defender(
        steps.warmup_pool() if cfg.coevolution.warmup_scenes else data["export"], None, "warmup", "clean"
    )
    pairs = steps.cold_start_pool() if cfg.attacker.cold_start_scenes else data["export"]
    cold = steps.train_attacker(pairs, None, None, "sft")
    info = environment(
        preset=preset, overrides=overrides, defender=defender, cold_start=cold, score_noise=args.score_noise
    )

    from stages.attacker import frozen_reward, items_from_version, load_attacker
    from storage import decode_image
    from training.attacker import scored_item

    sampled, dense = frozen_reward(store, cfg, defender, "sampled"), frozen_reward(store, cfg, defender, "dense")
    held_items = items_from_version(
        store, store.manifest(heldout), cfg.attacker.curriculum.max_items, cfg.attacker.keep_target_shapes
    )
    held = {it.id: it for it in held_items}
    named = implanter_descriptions(store, cfg, heldout) if args.named else {}

    def scored(
        name: str, attacker: str
    ) -> dict:  # the held-out items, edited and scored by the base config's curriculum
        row = {"try": name, "attacker": attacker}
        editor = load_attacker(store, attacker, cfg.attacker.model)
        for prefix, st in (("", steps), ("sde_", sde_steps)):
            if st is not None:
                s = st.curriculum(attacker, heldout, defender)
                row.update({prefix + k: s[v] for k, v in SCORES.items()})
                kept = [
                    r
                    for r in store.read(store.manifest(s["version"])).iter_rows(named=True)
                    if r["kind"] == "adversarial"
                ]
                its = [
                    scored_item(editor, held[r["id"].removesuffix(":attack")], cfg.attacker.edits_at_source_size)
                    for r in kept
                ]
                d = dense_drop(
                    dense, [it.image for it in its], [decode_image(r["image"]) for r in kept], its, len(held)
                )
                row.update({prefix + k: v for k, v in d.items()})
                if args.grids and not prefix:
                    save_grid(store, s["version"], Path(args.out) / f"{args.name}_{attacker}.png")
        if args.named:
            row.update(named_scores(cfg, editor, held_items, named, sampled, dense))
        return row

    rows = [implanter_scores(store, cfg, heldout, sampled, dense), scored("cold start", cold)]
    write_results(args.out, args.name, info | {"wall_seconds": round(time.perf_counter() - t0, 1)}, rows)
    for t in tries:
        started = time.perf_counter()
        tcfg = load_config(preset, overrides + t)
        tsteps = LocalSteps(store, tcfg, say)
        base = rows[1]
        own = [kv for kv in t if kv.startswith("attacker.cold_start")]  # cold_start.*, cold_start_scenes, ...
        if own:  # this try's own cold start, scored as its baseline
            own_pairs = tsteps.cold_start_pool() if tcfg.attacker.cold_start_scenes else data["export"]
            own_cold = tsteps.train_attacker(own_pairs, None, None, "sft")
            base = next((r for r in rows if r["attacker"] == own_cold), None)  # an earlier try's, scored once
            if base is None:
                base = scored("cold start " + ",".join(own), own_cold)
                rows.append(base)
                write_results(args.out, args.name, info | {"wall_seconds": round(time.perf_counter() - t0, 1)}, rows)
        if tcfg.attacker.rl.steps == 0:
            write_results(args.out, args.name, info | {"wall_seconds": round(time.perf_counter() - t0, 1)}, rows)
            continue
        attacker = tsteps.train_attacker(data["filter"], defender, base["attacker"], "grpo")
        rewards = store.read(store.manifest(attacker))["reward"].to_list()
        q = max(1, len(rewards) // 4)
        rows.append(
            {
                **scored(",".join(t) or "preset", attacker),
                "steps": len(rewards),
                "train_reward_first": sum(rewards[:q]) / q,
                "train_reward_last": sum(rewards[-q:]) / q,
                "seconds": round(time.perf_counter() - started, 1),
                "from": base["try"],
                **training_signal(store, attacker),
            }
        )
        for prefix in ("", "sde_") if sde_steps else ("",):
            rows[-1][prefix + "success_gain"] = rows[-1][prefix + "attack_success"] - base[prefix + "attack_success"]
            rows[-1][prefix + "lift_gain"] = rows[-1][prefix + "lift"] - base[prefix + "lift"]  # the phase's effect
            rows[-1][prefix + "dense_gain"] = rows[-1][prefix + "dense_drop"] - base[prefix + "dense_drop"]
        write_results(args.out, args.name, info | {"wall_seconds": round(time.perf_counter() - t0, 1)}, rows)
    print(
        f"\n{'attacker':<48} {'success':>8} {'lift':>7} {'lift gain':>9} {'flips':>6} {'integrity':>9} {'efficacy':>8} "
        f"{'dense drop':>10} {'reward 1st->last q':>19}"
        + (f" {'SDE success':>11} {'SDE lift':>8}" if sde_steps else "")
    )
    for r in rows:
        rew = f"{r['train_reward_first']:.3f} -> {r['train_reward_last']:.3f}" if "steps" in r else ""
        sde = f" {r['sde_attack_success']:>11.3f} {r['sde_lift']:>+8.3f}" if "sde_lift" in r else ""
        gain = f"{r['lift_gain']:+.3f}" if "lift_gain" in r else ""
        print(
            f"{r['try'][:48]:<48} {r['attack_success']:>8.3f} {r['lift']:>+7.3f} {gain:>9} "
            f"{r['flips']:>6.3f} {r['integrity']:>9.3f} {r['mean_efficacy']:>8.3f} "
            f"{r['dense_drop']:>+10.3f} {rew:>19}{sde}"
        )
    return rows


if __name__ == "__main__":
    main()
