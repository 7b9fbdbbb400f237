"""Progress lines of long model work (``models.progress``: fits and warm-ups inside a model load)
as Prefect run log lines too, so a run started from the UI shows them beside its task states.
Importing this module adds the sink; tasks/ imports it wherever a task may load a model."""

from __future__ import annotations

from prefect.exceptions import MissingContextError
from prefect.logging import get_run_logger

from models import progress


def to_run_log(line: str) -> None:
    """The line into the current flow or task run's log (INFO); outside a run, nowhere else
    (stderr already has it)."""
    try:
        get_run_logger().info(line)
    except MissingContextError:
        pass


if to_run_log not in progress.SINKS:
    progress.SINKS.append(to_run_log)
