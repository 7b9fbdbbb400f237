"""The AOT loop: the attacker and the defender take turns, every step a version with lineage.

    bootstrap (or a given AOT-SFT version)
    -> defender 0: supervised warm-up on clean images (the AOT-SFT version's, or a pool of fresh
       scenes: coevolution.warmup_scenes)
    -> for n = 1..N:
         attacker n: cold start (round 1) then Flow-GRPO against the frozen defender n-1
         curriculum n: the frozen attacker n edits the training items, scored by defender n-1
         defender n: DAPO from defender n-1 on curriculum n
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
from typing import Callable, Protocol

import polars as pl

from stages.config import PipelineConfig
from stages.version import code_version
from storage import Manifest, ShardStore, content_hash


class Steps(Protocol):
    """The stage calls the loop makes; each returns a version id (and summaries where noted)."""

    def bootstrap(self, source: str | None) -> dict: ...  # stage -> version
    def heldout(self) -> str: ...  # held-out filter version
    def warmup_pool(self) -> str: ...  # source version of coevolution.warmup_scenes fresh scenes
    def train_defender(self, data: str, init: str | None, mode: str, images: str) -> str: ...
    def train_attacker(self, data: str, defender: str | None, init: str | None, mode: str) -> str: ...
    def curriculum(self, attacker: str, data: str, defender: str) -> dict: ...  # {"version", summary...}
    def evaluate(self, defender: str, data: str) -> dict: ...  # summary


def heldout_config(cfg: PipelineConfig) -> PipelineConfig:
    """The held-out scenes: the same world settings under another seed, never trained on."""
    c = cfg.coevolution
    return world_config(cfg, c.heldout_seed_offset, c.heldout_scenes)


def warmup_config(cfg: PipelineConfig) -> PipelineConfig:
    """Defender 0's warm-up pool (``coevolution.warmup_scenes`` > 0): fresh scenes of the same world."""
    c = cfg.coevolution
    return world_config(cfg, c.warmup_seed_offset, c.warmup_scenes)


def world_config(cfg: PipelineConfig, seed_offset: int, scenes: int) -> PipelineConfig:
    """The same world settings under ``source.seed + seed_offset``, ``scenes`` scenes."""
    return dataclasses.replace(cfg, source=dataclasses.replace(cfg.source, seed=cfg.source.seed + seed_offset,
                                                                 num_scenes=scenes))


class LocalSteps:
    """The stage functions, in this process (``aot run --until coevolution --no-prefect``)."""

    def __init__(self, store: ShardStore, cfg: PipelineConfig, on_event: Callable[[str], None] | None = None):
        self.store, self.cfg, self.say = store, cfg, on_event or (lambda msg: None)

    def bootstrap(self, source):
        from stages.runner import run_bootstrap

        return {s.stage: s.version for s in run_bootstrap(self.store, self.cfg, source)}

    def heldout(self):
        from stages.runner import run_bootstrap

        found = run_bootstrap(self.store, heldout_config(self.cfg), None, until="filter")
        return found[-1].version

    def warmup_pool(self):
        from stages.runner import run_bootstrap

        return run_bootstrap(self.store, warmup_config(self.cfg), None, until="source")[-1].version

    def train_defender(self, data, init, mode, images):
        from training.stage import train_defender_version

        cfg = dataclasses.replace(self.cfg, defender=dataclasses.replace(self.cfg.defender, images=images))
        m, trained = train_defender_version(self.store, cfg, data, init, mode)
        ex = m.extra or {}
        target = ("" if not ex.get("held_back") else
                  f", held-back target {'reached' if ex.get('target_reached') else 'not reached'}")
        self.say(f"defender {mode} {'trained' if trained else 'found'}: {m.version} ({ex.get('steps')} steps{target})")
        return m.version

    def train_attacker(self, data, defender, init, mode):
        from training.attacker_stage import train_attacker_version

        m, trained = train_attacker_version(self.store, self.cfg, data, defender, init, mode)
        last = (m.extra or {}).get("final", {})
        shown = {k: last[k] for k in ("loss", "reward", "aot/integrity") if k in last}
        self.say(f"attacker {mode} {'trained' if trained else 'found'}: {m.version} (last step: "
                 + ", ".join(f"{k} {v:.3f}" for k, v in shown.items()) + ")")
        return m.version

    def curriculum(self, attacker, data, defender):
        from training.attacker_stage import generate_curriculum_version

        m = generate_curriculum_version(self.store, self.cfg, attacker, data, defender)
        self.say(f"curriculum: {m.version} ({m.extra['summary']['kept']} kept edits)")
        return {"version": m.version, **m.extra["summary"]}

    def evaluate(self, defender, data):
        from training.stage import evaluate_defender_version

        summary = evaluate_defender_version(self.store, self.cfg, defender, data).extra["summary"]
        self.say(f"evaluation of defender {defender} on {data}: " + ", ".join(f"{k} {v:.3f}" for k, v in summary.items()
                                                               if k.endswith("accuracy")))
        return summary


def run_coevolution(store: ShardStore, cfg: PipelineConfig, steps: Steps, source: str | None = None) -> Manifest:
    """The whole loop (see the module docstring); returns the ``coevolution`` version."""
    n_iter = cfg.coevolution.iterations
    data = steps.bootstrap(source)
    export, items = data["export"], data["filter"]
    heldout = steps.heldout()
    warmup = steps.warmup_pool() if cfg.coevolution.warmup_scenes else export
    defender = steps.train_defender(warmup, None, "warmup", "clean")  # defender 0 (defender.warmup, its own mode)
    base_clean = steps.evaluate(defender, heldout).get("clean_accuracy")
    rows, attacker = [], None
    lineage = {"export": export, "items": items, "heldout": heldout, "warmup": warmup, "defender_0": defender}
    for n in range(1, n_iter + 1):
        if attacker is None:
            attacker = steps.train_attacker(export, None, None, "sft")  # cold start, round 1 only
            lineage["attacker_cold_start"] = attacker
        # the phase's starting attacker on the held-out items (for n > 1: iteration n-1's "after", cached)
        attack_start = steps.curriculum(attacker, heldout, defender)
        attacker = steps.train_attacker(items, defender, attacker, "grpo")
        cur = steps.curriculum(attacker, items, defender)
        attack_before = steps.curriculum(attacker, heldout, defender)  # vs defender n-1, held out
        new_defender = steps.train_defender(cur["version"], defender, "dapo", "both")
        attack_after = steps.curriculum(attacker, heldout, new_defender)  # vs defender n
        clean = steps.evaluate(new_defender, heldout)
        attacked = steps.evaluate(new_defender, attack_after["version"])
        rows.append({
            "iteration": n, "attacker": attacker, "curriculum": cur["version"], "defender": new_defender,
            "curriculum_kept": cur["kept"], "curriculum_items": cur["items"],
            "attack_success_start": attack_start["attack_success_rate"],
            "attack_success_before": attack_before["attack_success_rate"],
            "attack_success_after": attack_after["attack_success_rate"],
            # success beyond the items the defender fails unedited (attack_summary): the attack's own effect
            "attack_lift_start": attack_start["attack_lift"], "attack_lift_before": attack_before["attack_lift"],
            "attack_lift_after": attack_after["attack_lift"],
            "integrity_rate": attack_before["integrity_rate"],
            "defender_clean_accuracy": clean.get("clean_accuracy"),
            "defender_attacked_accuracy": attacked.get("adversarial_accuracy"),
            **{f"strategy_{k}": v for k, v in cur["strategy_mix"].items()},
        })
        lineage[f"iteration_{n}"] = {k: rows[-1][k] for k in ("attacker", "curriculum", "defender")}
        defender = new_defender
    return write_run(store, cfg, rows, lineage, base_clean)


def write_run(store: ShardStore, cfg: PipelineConfig, rows: list[dict], lineage: dict, base_clean: float | None) -> Manifest:
    """The run's own version: the per-iteration table (part), plots and the report inputs."""
    export = store.manifest(lineage["export"])
    parents = [lineage["export"], lineage["heldout"]] + [r["defender"] for r in rows]
    config = {"coevolution": dataclasses.asdict(cfg.coevolution)}
    version = content_hash({"stage": "coevolution", "config": config, "code": code_version(), "parents": parents})
    done = store.manifest_at(export.dataset, "coevolution", version)
    if done is not None:
        return done
    df = pl.DataFrame(rows) if rows else pl.DataFrame({"iteration": []})
    with tempfile.TemporaryDirectory() as tmp:
        plot_iterations(rows, base_clean, os.path.join(tmp, "iterations.png"))
        files = store.put_folder(export.dataset, "coevolution", version, tmp)
    rec = store.write_shard(export.dataset, "coevolution", version, 0, content_hash(parents), len(rows), df,
                            pl.DataFrame(schema={"id": pl.String, "reason": pl.String}))
    return store.commit(export.dataset, "coevolution", version, [rec], config=config, parents=parents,
                        code_version=code_version(), files=files,
                        extra={"lineage": lineage, "base_clean_accuracy": base_clean})


def plot_iterations(rows: list[dict], base_clean: float | None, path: str) -> None:
    """The co-evolution curve: attack success before/after each defender phase, defender
    accuracy on clean and attacked held-out scenes, per iteration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    it = [r["iteration"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(8, 3))
    a.plot(it, [r["attack_success_before"] for r in rows], "o-", label="vs defender n-1")
    a.plot(it, [r["attack_success_after"] for r in rows], "s--", label="vs defender n")
    a.set_title("attack success (held out)")
    a.set_xlabel("iteration")
    a.legend(fontsize=7)
    accuracy_panel(b, it, [r["defender_clean_accuracy"] for r in rows], [r["defender_attacked_accuracy"] for r in rows],
                   base_clean)
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


def _png(store: ShardStore, m: Manifest, name: str) -> bytes | None:
    ref = next((f for f in m.files if f.path == name), None)
    return store.fs.cat_file(store.part_path(m, ref)) if ref else None


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

    cols = ["iteration", "attack_success_start", "attack_success_before", "attack_success_after", "defender_clean_accuracy",
            "defender_attacked_accuracy", "curriculum_kept", "integrity_rate"]
    fmt_v = (lambda v: f"{v:.3f}" if isinstance(v, float) else ("—" if v is None else str(v)))
    sections = [
        ("AOT co-evolution run " + version,
         f"Dataset version `{lin['export']}`, held-out scenes `{lin['heldout']}`, {len(rows)} iterations; "
         f"defender 0 (warm-up) clean accuracy on held-out scenes: {fmt_v(m.extra.get('base_clean_accuracy'))}. "
         "Attack success = share of held-out items whose edit keeps the targets intact and fools the defender "
         "at least once (start: attacker n-1 and before: attacker n, both against defender n-1; after: "
         "attacker n against defender n)."),
        ("Per iteration", None),
        ("Co-evolution curve", img(_png(store, m, "iterations.png"), "co-evolution curve")),
        ("Attacker reward", img(_figure_png(draw_rewards), "attacker reward curves")),
        ("Strategy mix of kept edits", img(_figure_png(draw_mix), "strategy mix")),
    ]
    grids = [(r["iteration"], _png(store, store.manifest(r["curriculum"]), "grid.png")) for r in rows]
    if fmt == "html":
        table = "<table><tr>" + "".join(f"<th>{c}</th>" for c in cols) + "</tr>" + "".join(
            "<tr>" + "".join(f"<td>{fmt_v(r.get(c))}</td>" for c in cols) + "</tr>" for r in rows) + "</table>"
        body = []
        for title, content in sections:
            body.append(f"<h2>{H.escape(title)}</h2>" + (f"<p>{content}</p>" if content else table))
        body.append("<h2>Clean (top) vs edited (bottom)</h2>" + "".join(
            f"<h3>iteration {n}</h3>{img(g, f'grid {n}')}" for n, g in grids if g))
        return ("<!doctype html><html><head><meta charset='utf-8'><title>AOT run</title><style>body{font-family:sans-serif;"
                "max-width:60em;margin:2em auto}td,th{border:1px solid #ccc;padding:.2em .5em}table{border-collapse:"
                "collapse}</style></head><body>" + "".join(body) + "</body></html>\n")
    table = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n" + "".join(
        "| " + " | ".join(fmt_v(r.get(c)) for c in cols) + " |\n" for r in rows)
    out = []
    for i, (title, content) in enumerate(sections):
        out.append(("# " if i == 0 else "## ") + title + "\n\n" + (content or table) + "\n")
    out.append("## Clean (top) vs edited (bottom)\n\n" + "\n\n".join(
        f"Iteration {n}:\n\n{img(g, f'grid {n}')}" for n, g in grids if g) + "\n")
    return "\n".join(out)
