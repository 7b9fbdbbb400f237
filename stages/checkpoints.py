"""What the trainer stages (defender, attacker) share: resuming from the last checkpoint of a
crashed run, checkpointing while training, the final checkpoint as the version's files, and a
version's files in the local cache.

While a version trains, checkpoints go to ``_work/latest`` in its folder; a rerun after a crash
resumes there, and the manifest (written last) makes the version visible. Each step's row also
goes to the run's trackers (``tracking.report_to``): TensorBoard event files under
``_work/tensorboard`` of the version's folder on a local root (live, and a resumed run adds to
them), in the run's temporary folder elsewhere; the finished version holds them as files under
``tensorboard/``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

import polars as pl

from models.cache import build_once, cache_root
from stages.version import VersionPart
from storage import Manifest, ShardStore
from training.distributed import is_main
from training.tracking import RunTracker

WORK = "_work/latest"
TENSORBOARD = "tensorboard"


def tensorboard_dir(store: ShardStore, dataset: str, stage: str, version: str, tmp: str) -> str:
    """Where a training version's event files are written while it trains: inside its folder on a
    local root (TensorBoard reads them live), else in the run's temporary folder."""
    if store.is_local:
        return os.path.join(store.version_path(dataset, stage, version), "_work", TENSORBOARD)
    return os.path.join(tmp, TENSORBOARD)


def fetch_version(store: ShardStore, m: Manifest) -> Path:
    """A version's files in the local cache (by version id), downloaded once: a reader never
    sees a half-written checkpoint, and concurrent loaders download once."""
    return build_once(cache_root() / "checkpoints" / m.version, lambda tmp: store.fetch_files(m, str(tmp)))


def resume_folder(store: ShardStore, dataset: str, stage: str, version: str, tmp: str) -> str | None:
    """The last checkpoint of an earlier, unfinished run of this version (downloaded into ``tmp``), or None."""
    path = os.path.join(tmp, "resume")
    return path if store.get_folder(dataset, stage, version, WORK, path) else None


def train_resumably(
    trainer,
    store: ShardStore,
    dataset: str,
    stage: str,
    version: str,
    tmp: str,
    steps: int,
    every: int,
    on_step: Callable[[dict], None] | None = None,
    report_to: list[str] = (),
    params: dict | None = None,
    parents: list[str] = (),
) -> None:
    """``trainer.train()``, saving a checkpoint to ``_work/latest`` every ``every`` steps (0: never),
    each step's row to the trackers of ``report_to`` (rank 0), with the version's config
    (``params``) and its id and parents as tags."""
    tags = {"stage": stage, "version": version, "dataset": dataset, "parents": list(parents)}
    logdir = tensorboard_dir(store, dataset, stage, version, tmp)
    with RunTracker(list(report_to) if is_main() else [], logdir, params, tags) as tracker:

        def hook(row: dict) -> None:
            tracker.log(row)
            if on_step:
                on_step(row)
            if every and trainer.step % every == 0 and trainer.step < steps and is_main():
                store.put_folder(
                    dataset, stage, version, str(trainer.save(os.path.join(tmp, f"ck-{trainer.step}"))), prefix=WORK
                )

        trainer.train(on_step=hook)


def trained_part(
    trainer,
    store: ShardStore,
    dataset: str,
    stage: str,
    version: str,
    tmp: str,
    plot: list[str],
    rows_in: int,
    extra: dict,
    add_files: Callable[[str], None] | None = None,
) -> VersionPart:
    """The finished trainer as a version's part: the final checkpoint (plus ``add_files(folder)``)
    and the metrics plot as files, one metrics row per step as the rows."""
    final = trainer.save(os.path.join(tmp, "final"))
    if add_files:
        add_files(str(final))
    events = tensorboard_dir(store, dataset, stage, version, tmp)
    if os.path.isdir(events):  # the run's event files (all its attempts') become the version's files
        shutil.copytree(events, os.path.join(final, TENSORBOARD), dirs_exist_ok=True)
    plot_metrics(trainer.metrics, os.path.join(final, "metrics.png"), plot)
    files = store.put_folder(dataset, stage, version, str(final))
    metrics = pl.DataFrame(trainer.metrics) if trainer.metrics else pl.DataFrame({"step": []})
    last = trainer.metrics[-1] if trainer.metrics else {}
    extra = {**extra, "steps": trainer.step, "final": {k: v for k, v in last.items() if isinstance(v, (int, float))}}
    return VersionPart(metrics, rows_in, files=files, extra=extra)


def plot_metrics(rows: list[dict], path: str, keys: list[str]) -> None:
    """One small panel per metric against the step (the run's plot artifact)."""
    if not rows:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.6), squeeze=False)
    steps = [r["step"] for r in rows]
    for ax, k in zip(axes[0], keys):
        ax.plot(steps, [r.get(k, float("nan")) for r in rows])
        ax.set_title(k)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
