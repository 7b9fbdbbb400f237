"""Where a training run's numbers go besides its version: the experiment trackers people who
run RL already watch, behind one setting (``tracking.report_to``, as TRL's ``report_to``).

A thin adapter over each tracker's own client, nothing more: ``tensorboard`` writes event files
with torch's ``SummaryWriter`` (TensorBoard's own format, read back by its ``EventAccumulator``);
``mlflow`` logs through ``MlflowClient`` to the server MLflow's own ``MLFLOW_TRACKING_URI`` names
(experiment ``MLFLOW_EXPERIMENT_NAME``, default ``aot``); ``wandb`` writes an offline W&B run
(``WANDB_MODE``, ``WANDB_DIR``, ``WANDB_PROJECT`` as W&B reads them); ``none`` writes nothing. The trainer
stages put the event files in the version's folder (stages/checkpoints.py), so
``tensorboard --logdir ROOT`` shows every run of a store. In MLflow every run is tagged
``aot.version`` with the version it wrote, which is how the co-evolution run nests the phases it
used under itself (``nest_runs``) even when they were trained, or found, by another process.
"""

from __future__ import annotations

import json
import math
import os
import time

from config.pipeline import TRACKERS

VERSION_TAG = "aot.version"  # an MLflow run's link back to the store
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own nesting tag (what mlflow.start_run(nested=True) sets)


def _flat(d: dict, prefix: str = "") -> dict[str, str]:
    """A nested config as MLflow params: dotted keys, values as text (MLflow keeps 6000 chars)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = (v if isinstance(v, str) else json.dumps(v, default=str))[:6000]
    return out


def _scalars(row: dict) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in row.items()
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }


def _reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail in seconds, naming the fix, when the tracking server does not answer: MLflow's own
    client retries a dead server with backoff for minutes before the trainer would start."""
    if not uri.startswith(("http://", "https://")):
        return  # a local store (sqlite:, file:) needs no server
    import urllib.request

    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).close()
    except Exception as e:  # noqa: BLE001 (any failure means the same thing to the user)
        raise ConnectionError(
            f"tracking.report_to has mlflow, but no MLflow server answers at {uri} ({e}): start one "
            "(mlflow server ...), fix MLFLOW_TRACKING_URI, or drop mlflow from --report-to"
        ) from None


class _Mlflow:
    """One MLflow run through the client API (no global active run: stages may run in threads)."""

    def __init__(self, name: str, params: dict | None, tags: dict | None, parent: str | None):
        import mlflow
        from mlflow import MlflowClient

        uri = mlflow.get_tracking_uri()  # MLFLOW_TRACKING_URI, as every MLflow user sets it
        _reachable(uri)
        self.client = MlflowClient(uri)
        experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME", "aot")
        found = self.client.get_experiment_by_name(experiment)
        exp_id = found.experiment_id if found else self.client.create_experiment(experiment)
        run_tags = {
            f"aot.{k}": (v if isinstance(v, str) else json.dumps(v, default=str))[:8000]  # MLflow's tag limit
            for k, v in (tags or {}).items()
        }
        if parent:
            run_tags[PARENT_TAG] = parent
        self.run_id = self.client.create_run(exp_id, tags=run_tags, run_name=name).info.run_id
        self.experiment_id = exp_id
        if params:
            from mlflow.entities import Param

            items = [Param(k, v) for k, v in _flat(params).items()]
            for i in range(0, len(items), 100):  # MLflow's log_batch takes at most 100 params a call
                self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in values.items()]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000])

    def image(self, key: str, image, step: int) -> None:
        # MLflow's image panel: the run page's "Images" section, one slider over the steps
        self.client.log_image(self.run_id, image, key=key, step=step)

    def close(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)


class _Wandb:
    """One W&B run through ``wandb.init(reinit="create_new")`` (a run object of its own, no global
    run: stages may run in threads). Offline unless ``WANDB_MODE`` says otherwise (no network
    here; ``wandb sync`` uploads an offline run later); files under ``WANDB_DIR`` (W&B's default:
    ./wandb), project ``WANDB_PROJECT`` or 'aot', grouped by ``WANDB_RUN_GROUP`` as W&B reads it.
    W&B has no nested runs; the version ids are tags and config (``aot``), as in MLflow."""

    def __init__(self, name: str, params: dict | None, tags: dict | None):
        import wandb

        text = {k: (v if isinstance(v, str) else json.dumps(v, default=str)) for k, v in (tags or {}).items()}
        self.run = wandb.init(
            mode=os.environ.get("WANDB_MODE", "offline"),
            project=os.environ.get("WANDB_PROJECT", "aot"),
            dir=os.environ.get("WANDB_DIR") or None,
            name=name,
            config={**(params or {}), "aot": text},
            tags=[f"{k}:{text[k]}"[:64] for k in ("stage", "version") if k in text],  # W&B: 64 chars a tag
            reinit="create_new",
            settings=wandb.Settings(silent=True, console="off"),
        )

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def image(self, key: str, image, step: int) -> None:
        import wandb

        self.run.log({key: wandb.Image(image)}, step=step)

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class RunTracker:
    """One run's tracker: ``log(row)`` after each step (every numeric value of the row as a
    scalar at ``row["step"]``), the resolved config (``params``) and the version ids (``tags``),
    ``close()`` at the end (also as a context manager; a run left by an exception is marked
    FAILED in MLflow). ``parent``: an MLflow run id to nest this run under."""

    def __init__(
        self,
        report_to: list[str],
        logdir: str,
        params: dict | None = None,
        tags: dict | None = None,
        name: str | None = None,
        parent: str | None = None,
    ):
        tags = tags or {}
        name = name or f"{tags.get('stage', 'run')} {tags.get('version', '')}".strip()  # "attacker <id>"
        unknown = sorted(set(report_to) - set(TRACKERS))
        if unknown:
            raise ValueError(f"tracking.report_to: unknown {unknown}; choose from {list(TRACKERS)}")
        self.logdir, self.tensorboard, self.mlflow, self.wandb = logdir, None, None, None
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=logdir)
            for key, value in (("config", params), ("tags", tags)):
                if value:  # markdown in TensorBoard's text tab: the run says what it was
                    self.tensorboard.add_text(key, "```\n" + json.dumps(value, indent=1, default=str) + "\n```")
        if "mlflow" in report_to:
            try:
                import mlflow  # noqa: F401
            except ImportError as e:
                raise ImportError("tracking.report_to has mlflow: pip install mlflow (requirements.txt)") from e
            self.mlflow = _Mlflow(name, params, tags, parent)
        if "wandb" in report_to:
            try:
                import wandb  # noqa: F401
            except ImportError as e:
                raise ImportError("tracking.report_to has wandb: pip install wandb (requirements.txt)") from e
            self.wandb = _Wandb(name, params, tags)

    @property
    def mlflow_run_id(self) -> str | None:
        return self.mlflow.run_id if self.mlflow else None

    def log(self, row: dict, step: int | None = None, prefix: str = "") -> None:
        values = _scalars(row)
        step = int(row.get("step", step or 0))
        if self.tensorboard is not None:
            for key, value in values.items():
                self.tensorboard.add_scalar(prefix + key, value, step)
        if self.mlflow is not None and values:
            self.mlflow.log({prefix + k: v for k, v in values.items()}, step)
        if self.wandb is not None and values:
            self.wandb.log({prefix + k: v for k, v in values.items()}, step)

    def image(self, key: str, png: bytes, step: int) -> None:
        """One picture at ``step`` (PNG bytes): TensorBoard's Images tab, MLflow's image panel."""
        import io

        import numpy as np
        from PIL import Image

        pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
        if self.tensorboard is not None:
            self.tensorboard.add_image(key, pixels, step, dataformats="HWC")
        if self.mlflow is not None:
            self.mlflow.image(key, pixels, step)
        if self.wandb is not None:
            self.wandb.image(key, pixels, step)

    def close(self, failed: bool = False) -> None:
        if self.tensorboard is not None:
            self.tensorboard.flush()
            self.tensorboard.close()
        if self.mlflow is not None:
            self.mlflow.close("FAILED" if failed else "FINISHED")
        if self.wandb is not None:
            self.wandb.close(failed)

    def __enter__(self) -> "RunTracker":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(failed=exc_type is not None)


def _adopt(tracker: RunTracker, parent: str, versions: list[str]) -> None:
    """Move the MLflow runs that wrote ``versions`` (their ``aot.version`` tag) under ``parent``;
    versions with no run (trained without mlflow) are listed in the parent's ``aot.untracked``."""
    client, untracked = tracker.mlflow.client, []
    for v in versions:
        runs = client.search_runs([tracker.mlflow.experiment_id], f"tags.`{VERSION_TAG}` = '{v}'", max_results=1)
        if runs:
            client.set_tag(runs[0].info.run_id, PARENT_TAG, parent)
        else:
            untracked.append(v)
    if untracked:
        client.set_tag(parent, "aot.untracked", json.dumps(untracked))


def nest_runs(tracker: RunTracker, direct: list[str], iterations: list[tuple[int, dict, list[str]]]) -> dict[int, str]:
    """The loop's tree in MLflow, under ``tracker``'s run: the runs that trained the ``direct``
    versions (the warm-up, the cold start), then one child run per iteration (its row's metrics)
    holding the runs that trained that iteration's phases. ``iterations``: (number, row, version
    ids). Runs are found by their ``aot.version`` tag, so phases trained by another process, or
    found cached from an earlier loop that logged them, nest too. Returns iteration -> run id."""
    if tracker.mlflow is None:
        return {}
    _adopt(tracker, tracker.mlflow.run_id, direct)
    out = {}
    for n, row, versions in iterations:
        with RunTracker(
            ["mlflow"],
            "",
            tags={"stage": "iteration", "iteration": n},
            name=f"iteration {n}",
            parent=tracker.mlflow.run_id,
        ) as it:
            it.log(row, step=n)
            _adopt(tracker, it.mlflow_run_id, versions)
            out[n] = it.mlflow_run_id
    return out
