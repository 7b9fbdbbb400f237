"""The `coevolution` flow: the whole AOT loop as one Prefect run (training/coevolution.py).

Each step is the stage's own flow or task, so the UI shows the run as its stages; each output
is a content-addressed version, so retrying the flow run (`prefect flow-run retry`) or rerunning
the deployment continues from the first unfinished step.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.bootstrap import DEFAULT_ROOT, STAGE_FLOWS, bootstrap, resolve_config
from storage import ShardStore
from tasks.training import evaluate_defender_task, generate_curriculum_task, publish_curriculum_artifacts, \
    publish_training_artifacts, train_attacker_task, train_defender_task
from training.coevolution import heldout_config, render_report, run_coevolution, warmup_config


class PrefectSteps:
    """``training.coevolution.Steps`` through the stage flows and tasks."""

    def __init__(self, root: str, preset: str, overrides: dict | None, storage_options: dict | None, progress: bool):
        self.root, self.preset, self.opts, self.progress = root, preset, storage_options, progress
        self.overrides = copy.deepcopy(overrides) or {}
        self.cfg = resolve_config(preset, self.overrides)
        self.store = ShardStore(root, storage_options)

    def bootstrap(self, source):
        out = bootstrap(root=self.root, preset=self.preset, overrides=self.overrides, source_version=source,
                        storage_options=self.opts, progress=self.progress)
        return {s["stage"]: s["version"] for s in out["stages"]}

    def heldout(self):
        return self._world(heldout_config(self.cfg), ("source", "extend", "filter"))

    def warmup_pool(self):
        return self._world(warmup_config(self.cfg), ("source",))

    def _world(self, cfg, stages) -> str:
        """The stage flows on another world of the same settings (one definition, as in LocalSteps)."""
        src = cfg.source
        over = {**copy.deepcopy(self.overrides), "source.seed": src.seed, "source.num_scenes": src.num_scenes}
        version = None
        for name in stages:
            version = STAGE_FLOWS[name](input_version=version, root=self.root, preset=self.preset, overrides=over,
                                        storage_options=self.opts, progress=self.progress)["version"]
        return version

    def train_defender(self, data, init, mode, images):
        cfg = dataclasses.replace(self.cfg, defender=dataclasses.replace(self.cfg.defender, images=images))
        out = train_defender_task(data, init, mode, cfg.to_dict(), self.root, self.opts)
        publish_training_artifacts(self.store, out["version"])
        return out["version"]

    def train_attacker(self, data, defender, init, mode):
        out = train_attacker_task(data, defender, init, mode, self.cfg.to_dict(), self.root, self.opts)
        publish_training_artifacts(self.store, out["version"])
        return out["version"]

    def curriculum(self, attacker, data, defender):
        out = generate_curriculum_task(attacker, data, defender, self.cfg.to_dict(), self.root, self.opts)
        publish_curriculum_artifacts(self.store, out["version"])
        return out

    def evaluate(self, defender, data):
        out = evaluate_defender_task(defender, data, self.cfg.to_dict(), self.root, self.opts)
        return {k: v for k, v in out.items() if k != "version"}


@flow(name="coevolution", description="The AOT loop: warm-up, then N rounds of attacker (Flow-GRPO) -> curriculum -> "
                                      "defender (DAPO) -> held-out evaluation.", validate_parameters=True)
def coevolution(root: str = DEFAULT_ROOT, preset: str = "synthetic", iterations: int | None = None,
                source_version: str | None = None, overrides: dict[str, Any] | None = None,
                storage_options: dict[str, Any] | None = None, progress: bool = True) -> dict:
    overrides = dict(overrides or {})
    if iterations is not None:
        overrides["coevolution.iterations"] = iterations
    steps = PrefectSteps(root, preset, overrides, storage_options, progress)
    m = run_coevolution(steps.store, steps.cfg, steps, source_version)
    rows = steps.store.read(m).to_dicts()
    create_table_artifact(key="coevolution-iterations", table=rows, description=f"per-iteration results of {m.version}")
    # The whole report (table, curves, reward curves, strategy mix, edit grids; images inlined).
    create_markdown_artifact(key="coevolution-report", markdown=render_report(steps.store, m.version, "md"),
                             description=f"co-evolution run {m.version}; also: aot report {m.version} --root {root}")
    return {"version": m.version, "iterations": rows}
