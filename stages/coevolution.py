"""The AOT loop: the attacker and the defender take turns, every step a version with lineage.

    bootstrap (or a given AOT-SFT version)
    -> defender 0: supervised warm-up on clean images (the AOT-SFT version's, or a pool of fresh
       scenes: coevolution.warmup_scenes)
    -> for n = 1..N:
         attacker n: cold start (round 1) then Flow-GRPO against the frozen defender n-1
         curriculum n: the frozen attacker n edits the training items, scored by defender n-1
         defender n: DAPO from defender n-1 on curriculum n (with coevolution.curriculum_replay
                     = k, on curricula n-k..n-1 as well)
         evaluation: defender n on held-out clean scenes and on held-out scenes attacked by
                     attacker n. Attack success on the same held-out items: attacker n-1 (the
                     cold start for n = 1) and attacker n against defender n-1 (did the attacker
                     phase raise it?), attacker n against defender n (did the defender phase lower it?)

Checkpoints chain explicitly (each call names its inputs). Every step's version id hashes its
config, code and parents, so a rerun after a crash or a cancel finds every finished step in
the store and continues from the first missing one; a finished iteration is never recomputed.

The loop is written once, against ``Steps`` — the stage functions in-process, or the Prefect
tasks (flows/coevolution.py) — and ends by writing a ``coevolution`` version: the
per-iteration table, plots and a report (``aot report``).
"""

from __future__ import annotations

import dataclasses
import os
import tempfile

import polars as pl

from config import PipelineConfig
from stages.steps import Steps
from stages.version import VersionPart, single_part_version
from storage import Manifest, ShardStore
from training.tracking import RunTracker, nest_runs


def loop_start(steps: Steps, cfg: PipelineConfig, source: str | None = None) -> dict:
    """What the loop starts from, as versions: ``export``, the training ``items`` (the filter's),
    the ``heldout`` items, the ``warmup`` data and ``defender_0`` (defender.warmup, its own mode)."""
    from stages.defender import initial_model_spec

    initial_model_spec(cfg)  # a defender.model that cannot start the loop fails before the bootstrap runs
    data = {s["stage"]: s["version"] for s in steps.bootstrap(source)}
    heldout = steps.heldout()
    warmup = steps.warmup_pool() if cfg.coevolution.warmup_scenes else data["export"]
    defender = steps.train_defender(warmup, None, "warmup", "clean")
    return {
        "export": data["export"],
        "items": data["filter"],
        "heldout": heldout,
        "warmup": warmup,
        "defender_0": defender,
    }


def run_coevolution(store: ShardStore, cfg: PipelineConfig, steps: Steps, source: str | None = None) -> Manifest:
    """The whole loop (see the module docstring); returns the ``coevolution`` version."""
    n_iter = cfg.coevolution.iterations
    lineage = loop_start(steps, cfg, source)
    export, items, heldout, defender = (lineage[k] for k in ("export", "items", "heldout", "defender_0"))
    base_clean = steps.evaluate(defender, heldout).get("clean_accuracy")
    rows, attacker = [], None
    for n in range(1, n_iter + 1):
        if attacker is None:
            pairs = steps.cold_start_pool() if cfg.attacker.cold_start_scenes else export
            attacker = steps.train_attacker(pairs, None, None, "sft")  # cold start, round 1 only
            lineage["attacker_cold_start"] = attacker
        # the phase's starting attacker on the held-out items (for n > 1: iteration n-1's "after", cached)
        attack_start = steps.curriculum(attacker, heldout, defender)
        attacker = steps.train_attacker(items, defender, attacker, "grpo")
        cur = steps.curriculum(attacker, items, defender)
        attack_before = steps.curriculum(attacker, heldout, defender)  # vs defender n-1, held out
        # this iteration's curriculum, and the replayed ones of the iterations before it (oldest first)
        k = cfg.coevolution.curriculum_replay
        replayed = [r["curriculum"] for r in rows[-k:]] if k else []
        new_defender = steps.train_defender(cur["version"], defender, "dapo", "both", also=replayed)
        attack_after = steps.curriculum(attacker, heldout, new_defender)  # vs defender n
        clean = steps.evaluate(new_defender, heldout)
        attacked = steps.evaluate(new_defender, attack_after["version"])
        rows.append(
            {
                "iteration": n,
                "attacker": attacker,
                "curriculum": cur["version"],
                "defender": new_defender,
                "curriculum_kept": cur["kept"],
                "curriculum_items": cur["items"],
                "attack_success_start": attack_start["attack_success_rate"],
                "attack_success_before": attack_before["attack_success_rate"],
                "attack_success_after": attack_after["attack_success_rate"],
                # success beyond the items the defender fails unedited (attack_summary): the attack's own effect
                "attack_lift_start": attack_start["attack_lift"],
                "attack_lift_before": attack_before["attack_lift"],
                "attack_lift_after": attack_after["attack_lift"],
                "integrity_rate": attack_before["integrity_rate"],
                "defender_clean_accuracy": clean.get("clean_accuracy"),
                "defender_attacked_accuracy": attacked.get("adversarial_accuracy"),
                **{f"strategy_{k}": v for k, v in cur["strategy_mix"].items()},
                "curriculum_moved": cur.get("moved_fraction"),
            }
        )
        lineage[f"iteration_{n}"] = {k: rows[-1][k] for k in ("attacker", "curriculum", "defender")}
        defender = new_defender
    return write_run(store, cfg, rows, lineage, base_clean)


def write_run(
    store: ShardStore, cfg: PipelineConfig, rows: list[dict], lineage: dict, base_clean: float | None
) -> Manifest:
    """The run's own version: the per-iteration table (part), plots and the report inputs."""
    export = store.manifest(lineage["export"])
    parents = [lineage["export"], lineage["heldout"]] + [r["defender"] for r in rows]
    config = {"coevolution": dataclasses.asdict(cfg.coevolution)}

    def compute(version: str) -> VersionPart:
        with tempfile.TemporaryDirectory() as tmp:
            plot_iterations(rows, base_clean, os.path.join(tmp, "iterations.png"))
            tags = {"stage": "coevolution", "version": version, "lineage": lineage}
            with RunTracker(cfg.tracking.report_to, os.path.join(tmp, "tensorboard"), config, tags) as tracker:
                if base_clean is not None:  # defender 0 at iteration 0, so the curve starts where the loop did
                    tracker.log({"defender_clean_accuracy": base_clean}, step=0)
                for r in rows:  # the per-iteration table, one step per iteration
                    tracker.log(r, step=r["iteration"])
                    grid = store.read_file(store.manifest(r["curriculum"]), "grid.png")
                    if grid:  # what the attacker of this iteration did, clean over edited
                        tracker.image("clean_vs_edited", grid, r["iteration"])
                # MLflow: coevolution -> iteration -> the phases' own training runs
                nest_runs(
                    tracker,
                    [lineage[k] for k in ("defender_0", "attacker_cold_start") if k in lineage],
                    [(r["iteration"], r, [r["attacker"], r["defender"]]) for r in rows],
                )
            files = store.put_folder(export.dataset, "coevolution", version, tmp)
        df = pl.DataFrame(rows) if rows else pl.DataFrame({"iteration": []})
        return VersionPart(df, len(rows), files=files, extra={"lineage": lineage, "base_clean_accuracy": base_clean})

    return single_part_version(
        store,
        export.dataset,
        "coevolution",
        config,
        parents,
        (__name__,),
        compute,
    )[0]


def plot_iterations(rows: list[dict], base_clean: float | None, path: str) -> None:
    """The co-evolution curve: attack success through each attacker and defender phase, defender
    accuracy on clean and attacked held-out scenes, per iteration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    it = [r["iteration"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(8, 3))
    # Phase by phase on the same held-out items: iteration n's attacker phase takes success from
    # x = n - 1 (attacker n-1 vs defender n-1) to n - 1/2 (attacker n vs defender n-1), its
    # defender phase from there to n (attacker n vs defender n). A rising solid segment is an
    # attacker that learned to attack; a falling dashed one a defender that learned to resist.
    for k, r in enumerate(rows):
        n = r["iteration"]
        start, before, after = r["attack_success_start"], r["attack_success_before"], r["attack_success_after"]
        if start is not None and before is not None:
            a.plot([n - 1, n - 0.5], [start, before], "o-", color="C3", label="attacker phase" if k == 0 else None)
        if before is not None and after is not None:
            a.plot([n - 0.5, n], [before, after], "s--", color="C0", label="defender phase" if k == 0 else None)
    a.set_title("attack success (held out)")
    a.set_xlabel("iteration")
    a.legend(fontsize=7)
    accuracy_panel(
        b, it, [r["defender_clean_accuracy"] for r in rows], [r["defender_attacked_accuracy"] for r in rows], base_clean
    )
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def accuracy_panel(ax, iterations: list, clean: list, attacked: list, base_clean: float | None = None) -> None:
    """The defender's held-out accuracy per iteration, clean and under attacker n."""
    ax.plot(iterations, clean, "o-", label="clean")
    ax.plot(iterations, attacked, "s--", label="attacked (attacker n)")
    if base_clean is not None:
        ax.axhline(base_clean, color="grey", lw=0.8, label="defender 0, clean")
    ax.set_title("defender accuracy (held out)")
    ax.set_xlabel("iteration")
    ax.legend(fontsize=7)


def _figure_png(draw) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 2.8))
    draw(ax)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return buf.getvalue()


def render_report(store: ShardStore, version: str, fmt: str = "md") -> str:
    """A self-contained report of a coevolution run (images inlined as data URIs): the
    per-iteration table, the co-evolution curve, attacker reward curves, the strategy mix per
    iteration and a clean-vs-edited grid per iteration. ``fmt``: ``md`` or ``html``."""
    import base64
    import html as H

    m = store.manifest(version)
    if m.stage != "coevolution":
        raise ValueError(f"{version} is a {m.stage} version; give a coevolution run (aot ls --stage coevolution)")
    df = store.read(m)
    rows = df.to_dicts()
    lin = m.extra["lineage"]

    def img(data: bytes | None, alt: str) -> str:
        if not data:
            return ""
        uri = "data:image/png;base64," + base64.b64encode(data).decode()
        return f'<img alt="{H.escape(alt)}" src="{uri}"/>' if fmt == "html" else f"![{alt}]({uri})"

    curves = {r["iteration"]: store.read(store.manifest(r["attacker"])) for r in rows}

    def draw_rewards(ax):
        for n, met in curves.items():
            ax.plot(met["step"].to_list(), met["reward"].to_list(), label=f"attacker {n}")
        ax.set_xlabel("Flow-GRPO step")
        ax.set_ylabel("reward")
        ax.legend(fontsize=7)

    strategies = [c.removeprefix("strategy_") for c in df.columns if c.startswith("strategy_")]

    def draw_mix(ax):
        bottom = [0.0] * len(rows)
        for s in strategies:
            vals = [r[f"strategy_{s}"] for r in rows]
            ax.bar([r["iteration"] for r in rows], vals, bottom=bottom, label=s)
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.set_xlabel("iteration")
        ax.set_ylabel("share of kept edits")
        ax.legend(fontsize=6)

    cols = [
        "iteration",
        "attack_success_start",
        "attack_success_before",
        "attack_success_after",
        "defender_clean_accuracy",
        "defender_attacked_accuracy",
        "curriculum_kept",
        "integrity_rate",
    ]

    def fmt_v(v):
        return f"{v:.3f}" if isinstance(v, float) else ("—" if v is None else str(v))

    sections = [
        (
            "AOT co-evolution run " + version,
            f"Dataset version `{lin['export']}`, held-out scenes `{lin['heldout']}`, {len(rows)} iterations; "
            f"defender 0 (warm-up) clean accuracy on held-out scenes: {fmt_v(m.extra.get('base_clean_accuracy'))}. "
            "Attack success = share of held-out items whose edit keeps the targets intact and fools the defender "
            "at least once (start: attacker n-1 and before: attacker n, both against defender n-1; after: "
            "attacker n against defender n).",
        ),
        ("Per iteration", None),
        ("Co-evolution curve", img(store.read_file(m, "iterations.png"), "co-evolution curve")),
        ("Attacker reward", img(_figure_png(draw_rewards), "attacker reward curves")),
        ("Strategy mix of kept edits", img(_figure_png(draw_mix), "strategy mix")),
    ]
    grids = [(r["iteration"], store.read_file(store.manifest(r["curriculum"]), "grid.png")) for r in rows]
    if fmt == "html":
        table = (
            "<table><tr>"
            + "".join(f"<th>{c}</th>" for c in cols)
            + "</tr>"
            + "".join("<tr>" + "".join(f"<td>{fmt_v(r.get(c))}</td>" for c in cols) + "</tr>" for r in rows)
            + "</table>"
        )
        body = []
        for title, content in sections:
            body.append(f"<h2>{H.escape(title)}</h2>" + (f"<p>{content}</p>" if content else table))
        body.append(
            "<h2>Clean (top) vs edited (bottom)</h2>"
            + "".join(f"<h3>iteration {n}</h3>{img(g, f'grid {n}')}" for n, g in grids if g)
        )
        return (
            "<!doctype html><html><head><meta charset='utf-8'><title>AOT run</title><style>body{font-family:sans-serif;"
            "max-width:60em;margin:2em auto}td,th{border:1px solid #ccc;padding:.2em .5em}table{border-collapse:"
            "collapse}</style></head><body>" + "".join(body) + "</body></html>\n"
        )
    table = (
        "| "
        + " | ".join(cols)
        + " |\n|"
        + "---|" * len(cols)
        + "\n"
        + "".join("| " + " | ".join(fmt_v(r.get(c)) for c in cols) + " |\n" for r in rows)
    )
    out = []
    for i, (title, content) in enumerate(sections):
        out.append(("# " if i == 0 else "## ") + title + "\n\n" + (content or table) + "\n")
    out.append(
        "## Clean (top) vs edited (bottom)\n\n"
        + "\n\n".join(f"Iteration {n}:\n\n{img(g, f'grid {n}')}" for n, g in grids if g)
        + "\n"
    )
    return "\n".join(out)
