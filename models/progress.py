"""Progress of long one-time work that runs inside a model load (a tiny editor's fits, a warmed
defender's warm-up): minutes on a CPU with nothing else on screen. One line about every tenth
of the way, with the time left at the pace so far, written to stderr (not ``print``: a flow's
``log_prints`` would route it to a run logger, which the CLI keeps at WARNING, and the line
would show nowhere) and to every callable in ``SINKS`` (tasks/run_log.py adds the Prefect run
log, so a run started from the UI shows the lines too)."""

from __future__ import annotations

import sys
import time
from typing import Callable

SINKS: list[Callable[[str], None]] = []  # where else a progress line goes


def say(line: str) -> None:
    """One progress line: stderr, then every sink."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
    for sink in SINKS:
        sink(line)


class StepProgress:
    """``progress(step, loss)`` after each of ``total`` steps; says a line when ``step`` reaches
    or passes the next tenth (and at the end): ``NAME: step S/T, loss L, E s, ~R s left``, L the
    mean loss since the last line. ``step`` may jump (a batch of answers at a time). Returns the
    line it said, or None."""

    def __init__(
        self, name: str, total: int, lines: int = 10, clock=time.perf_counter, unit: str = "step", metric: str = "loss"
    ):
        self.name, self.total, self.clock, self.unit, self.metric = name, total, clock, unit, metric
        self.every = max(1, total // lines)
        self.t0, self.losses, self.said = clock(), [], 0

    def __call__(self, step: int, loss: float | None = None) -> str | None:
        if loss is not None:
            self.losses.append(float(loss))
        if step // self.every <= self.said and step < self.total:
            return None
        self.said = step // self.every
        elapsed = self.clock() - self.t0
        left = elapsed / max(1, step) * (self.total - step)
        mean = f", {self.metric} {sum(self.losses) / len(self.losses):.4f}" if self.losses else ""
        line = f"{self.name}: {self.unit} {step}/{self.total}{mean}, {elapsed:.0f} s, ~{left:.0f} s left"
        self.losses = []
        say(line)
        return line
