"""The `coevolution` flow: the whole AOT loop as one Prefect run (stages/coevolution.py).

Each step is the stage's own flow or task, so the UI shows the run as its stages; each output
is a content-addressed version, so retrying the flow run (`prefect flow-run retry`) or rerunning
the deployment continues from the first unfinished step.
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.bootstrap import DEFAULT_ROOT
from flows.steps import PrefectSteps
from stages.coevolution import render_report, run_coevolution


@flow(
    name="coevolution",
    description="The AOT loop: warm-up, then N rounds of attacker (Flow-GRPO) -> curriculum -> "
    "defender (DAPO) -> held-out evaluation.",
    validate_parameters=True,
)
def coevolution(
    root: str = DEFAULT_ROOT,
    preset: str = "synthetic",
    iterations: int | None = None,
    source_version: str | None = None,
    overrides: dict[str, Any] | None = None,
    storage_options: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict:
    overrides = dict(overrides or {})
    if iterations is not None:
        overrides["coevolution.iterations"] = iterations
    steps = PrefectSteps(root, preset, overrides, storage_options, progress)
    m = run_coevolution(steps.store, steps.cfg, steps, source_version)
    rows = steps.store.read(m).to_dicts()
    create_table_artifact(key="coevolution-iterations", table=rows, description=f"per-iteration results of {m.version}")
    # The whole report (table, curves, reward curves, strategy mix, edit grids; images inlined).
    create_markdown_artifact(
        key="coevolution-report",
        markdown=render_report(steps.store, m.version, "md"),
        description=f"co-evolution run {m.version}; also: aot report {m.version} --root {root}",
    )
    return {"version": m.version, "iterations": rows}
