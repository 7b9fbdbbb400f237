"""The one execution seam: every command and the co-evolution loop call stages through ``Steps``.

``LocalSteps`` runs the stage functions in this process (``--no-prefect``, tests, experiments);
``flows.steps.PrefectSteps`` runs the same calls as Prefect flows and tasks. Each call names its
inputs and returns version ids (and summaries where noted), so a caller never knows which ran.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Protocol, Sequence

from config import PipelineConfig
from storage import ShardStore


class Steps(Protocol):
    def stage(self, name: str, input_version: str | None) -> dict: ...  # the stage's summary
    def bootstrap(self, source: str | None) -> list[dict]: ...  # every bootstrap stage's summary, in order
    def heldout(self) -> str: ...  # held-out filter version
    def warmup_pool(self) -> str: ...  # source version of coevolution.warmup_scenes fresh scenes
    def cold_start_pool(self) -> str: ...  # implanter pairs (attack version) of attacker.cold_start_scenes fresh scenes
    def train_defender(
        self, data: str, init: str | None, mode: str, images: str | None = None, also: Sequence[str] = ()
    ) -> str: ...  # also: further data versions trained on beside data
    def evaluate(self, defender: str, data: str) -> dict: ...  # summary
    def train_attacker(self, data: str, defender: str | None, init: str | None, mode: str) -> str: ...
    def curriculum(self, attacker: str, data: str, defender: str) -> dict: ...  # {"version", summary...}
    def coevolution(self, source: str | None) -> str: ...


class LocalSteps:
    """The stage functions, in this process. ``say`` hears one line per finished step (and the
    curriculum's progress); ``on_step`` every trainer step's metrics row."""

    def __init__(
        self,
        store: ShardStore,
        cfg: PipelineConfig,
        say: Callable[[str], None] | None = None,
        on_step: Callable[[dict], None] | None = None,
    ):
        self.store, self.cfg, self.say, self.on_step = store, cfg, say or (lambda msg: None), on_step

    def stage(self, name, input_version):
        from stages.runner import run_stage

        return run_stage(self.store, name, self.cfg, input_version).to_dict()

    def bootstrap(self, source, cfg: PipelineConfig | None = None, until: str = "export"):
        from stages.runner import run_bootstrap

        return [s.to_dict() for s in run_bootstrap(self.store, cfg or self.cfg, source, until)]

    def heldout(self):
        from stages.source import heldout_config

        return self.bootstrap(None, heldout_config(self.cfg), until="filter")[-1]["version"]

    def warmup_pool(self):
        from stages.source import warmup_config

        return self.bootstrap(None, warmup_config(self.cfg), until="source")[-1]["version"]

    def cold_start_pool(self):
        from stages.attack import attack_version
        from stages.source import cold_start_config

        items = self.bootstrap(None, cold_start_config(self.cfg), until="filter")[-1]["version"]
        m = attack_version(self.store, self.cfg, items, "implanter")
        self.say(f"cold-start pool: {m.version} ({m.rows} implanted pairs of {m.rows_in} fresh scenes)")
        return m.version

    def train_defender(self, data, init, mode, images=None, also=()):
        from stages.defender import train_defender_version

        cfg = (
            self.cfg
            if images is None
            else dataclasses.replace(self.cfg, defender=dataclasses.replace(self.cfg.defender, images=images))
        )
        m, trained = train_defender_version(self.store, cfg, data, init, mode, on_step=self.on_step, also=also)
        ex = m.extra or {}
        target = (
            ""
            if not ex.get("held_back")
            else f", held-back target {'reached' if ex.get('target_reached') else 'not reached'}"
        )
        self.say(f"defender {mode} {'trained' if trained else 'found'}: {m.version} ({ex.get('steps')} steps{target})")
        return m.version

    def evaluate(self, defender, data):
        from stages.defender import evaluate_defender_version

        summary = evaluate_defender_version(self.store, self.cfg, defender, data).extra["summary"]
        self.say(
            f"evaluation of defender {defender} on {data}: "
            + ", ".join(f"{k} {v:.3f}" for k, v in summary.items() if k.endswith("accuracy"))
        )
        return summary

    def train_attacker(self, data, defender, init, mode):
        from stages.attacker import train_attacker_version

        m, trained = train_attacker_version(self.store, self.cfg, data, defender, init, mode, on_step=self.on_step)
        last = (m.extra or {}).get("final", {})
        shown = {k: last[k] for k in ("loss", "reward", "aot/integrity") if k in last}
        self.say(
            f"attacker {mode} {'trained' if trained else 'found'}: {m.version} (last step: "
            + ", ".join(f"{k} {v:.3f}" for k, v in shown.items())
            + ")"
        )
        return m.version

    def curriculum(self, attacker, data, defender):
        from stages.curriculum import curriculum_progress, generate_curriculum_version

        m = generate_curriculum_version(
            self.store, self.cfg, attacker, data, defender, on_item=curriculum_progress(self.say)
        )
        self.say(f"curriculum: {m.version} ({m.extra['summary']['kept']} kept edits)")
        return {"version": m.version, **m.extra["summary"]}

    def coevolution(self, source):
        from stages.coevolution import run_coevolution

        return run_coevolution(self.store, self.cfg, self, source).version
