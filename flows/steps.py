"""``stages.steps.Steps`` through Prefect: each call runs the stage's own flow (a subflow inside
the ``coevolution`` flow), so the UI shows a run as its stages, and every output is a
content-addressed version (a retried flow run continues from the first unfinished step)."""

from __future__ import annotations

import copy

from flows.attacker import generate_curriculum, train_attacker
from flows.bootstrap import STAGE_FLOWS, bootstrap, make_task_runner, resolve_config
from flows.defender import evaluate_defender, train_defender
from stages.base import STAGES
from stages.runner import check_chain, check_scenes
from storage import ShardStore


class FlowRunFailed(RuntimeError):
    """A flow run ended in a state other than Completed; says how to retry it."""

    def __init__(self, state, entrypoint: str):
        super().__init__(f"the run ended {state.name}: {state.message}")
        self.flow_run_id, self.entrypoint = state.state_details.flow_run_id, entrypoint

    def retry_hint(self) -> str:
        return (
            f"finished shards are kept; rerun the same command to compute only the missing ones,\n"
            f"or retry this flow run: prefect flow-run retry {self.flow_run_id} --entrypoint {self.entrypoint}"
        )


def _completed(flow_, entrypoint: str, **kw):
    state = flow_(return_state=True, **kw)
    if not state.is_completed():
        raise FlowRunFailed(state, entrypoint)
    return state.result()


class PrefectSteps:
    def __init__(
        self,
        root: str,
        preset: str,
        overrides: dict | None,
        storage_options: dict | None,
        progress: bool = True,
        refresh_cache: bool = False,
        task_runner: str | None = None,
    ):
        self.root, self.preset, self.opts, self.progress = root, preset, storage_options, progress
        self.refresh_cache, self.task_runner = refresh_cache, task_runner
        self.overrides = copy.deepcopy(overrides) or {}
        self.cfg = resolve_config(preset, self.overrides)
        self.store = ShardStore(root, storage_options)

    def _flow_args(self, overrides: dict | None = None) -> dict:
        return dict(
            root=self.root,
            preset=self.preset,
            overrides=self.overrides if overrides is None else overrides,
            storage_options=self.opts,
            progress=self.progress,
            refresh_cache=self.refresh_cache,
        )

    def stage(self, name, input_version):
        check_scenes(self.store, STAGES[name], self.cfg, input_version)  # before Prefect starts
        flow_ = STAGE_FLOWS[name]
        if self.task_runner:
            flow_ = flow_.with_options(task_runner=make_task_runner(self.task_runner))
        return _completed(flow_, f"flows/bootstrap.py:{name}_flow", input_version=input_version, **self._flow_args())

    def bootstrap(self, source):
        check_chain(self.store, self.cfg, source)  # before Prefect starts
        return _completed(
            bootstrap,
            "flows/bootstrap.py:bootstrap",
            source_version=source,
            task_runner=self.task_runner,
            **self._flow_args(),
        )["stages"]

    def _training_args(self, **extra) -> dict:
        over = copy.deepcopy(self.overrides)
        over.update(extra)  # dotted keys, after the caller's (possibly nested) ones: nest_dotted merges them
        return dict(root=self.root, preset=self.preset, overrides=over, storage_options=self.opts)

    def heldout(self):
        from stages.source import heldout_config

        return self._world(heldout_config(self.cfg), ("source", "extend", "filter"))

    def warmup_pool(self):
        from stages.source import warmup_config

        return self._world(warmup_config(self.cfg), ("source",))

    def cold_start_pool(self):
        from stages.attack import attack_version
        from stages.source import cold_start_config

        items = self._world(cold_start_config(self.cfg), ("source", "extend", "filter"))
        return attack_version(self.store, self.cfg, items, "implanter").version  # in-process: oracles are cheap

    def _world(self, cfg, stages) -> str:
        """The stage flows on another world of the same settings (stages.source defines it)."""
        over = {
            **copy.deepcopy(self.overrides),
            "source.seed": cfg.source.seed,
            "source.num_scenes": cfg.source.num_scenes,
        }
        version = None
        for name in stages:
            version = STAGE_FLOWS[name](input_version=version, **self._flow_args(over))["version"]
        return version

    def train_defender(self, data, init, mode, images=None, also=()):
        extra = {"defender.images": images} if images else {}
        replay = {"also_versions": list(also)} if also else {}  # a run without it keeps its parameters
        return train_defender(
            data_version=data, init_version=init, mode=mode, **replay, **self._training_args(**extra)
        )["version"]

    def evaluate(self, defender, data):
        out = evaluate_defender(checkpoint_version=defender, data_version=data, **self._training_args())
        return {k: v for k, v in out.items() if k != "version"}

    def train_attacker(self, data, defender, init, mode):
        return train_attacker(
            data_version=data, defender_version=defender, init_version=init, mode=mode, **self._training_args()
        )["version"]

    def curriculum(self, attacker, data, defender):
        return generate_curriculum(
            attacker_version=attacker, data_version=data, defender_version=defender, **self._training_args()
        )

    def coevolution(self, source):
        from flows.coevolution import coevolution

        return coevolution(
            root=self.root,
            preset=self.preset,
            source_version=source,
            overrides=self.overrides,
            storage_options=self.opts,
            progress=self.progress,
        )["version"]
