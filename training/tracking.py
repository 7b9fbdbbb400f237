"""Where a training run's numbers go besides its version: the experiment trackers people who
run RL already watch, behind one setting (``tracking.report_to``, as TRL's ``report_to``).

A thin adapter over each tracker's own client, nothing more: ``tensorboard`` writes event files
with torch's ``SummaryWriter`` (TensorBoard's own format, read back by its ``EventAccumulator``);
``none`` writes nothing. The trainer stages put the event files in the version's folder
(stages/checkpoints.py), so ``tensorboard --logdir ROOT`` shows every run of a store.
"""

from __future__ import annotations

import json
import math

from config.pipeline import TRACKERS


class RunTracker:
    """One run's tracker: ``log(row)`` after each step (every numeric value of the row as a
    scalar at ``row["step"]``), the resolved config and the version ids as text, ``close()``
    at the end (also as a context manager)."""

    def __init__(self, report_to: list[str], logdir: str, params: dict | None = None, tags: dict | None = None):
        unknown = sorted(set(report_to) - set(TRACKERS))
        if unknown:
            raise ValueError(f"tracking.report_to: unknown {unknown}; choose from {list(TRACKERS)}")
        self.logdir, self.tensorboard = logdir, None
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=logdir)
            for name, value in (("config", params), ("tags", tags)):
                if value:  # markdown in TensorBoard's text tab: the run says what it was
                    self.tensorboard.add_text(name, "```\n" + json.dumps(value, indent=1, default=str) + "\n```")

    def log(self, row: dict, step: int | None = None, prefix: str = "") -> None:
        if self.tensorboard is None:
            return
        step = int(row.get("step", step or 0))
        for key, value in row.items():
            if (
                key != "step"
                and isinstance(value, (int, float))
                and not isinstance(value, bool)
                and math.isfinite(value)
            ):
                self.tensorboard.add_scalar(prefix + key, value, step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.flush()
            self.tensorboard.close()

    def __enter__(self) -> "RunTracker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
