"""Prefect flows: one per stage, and ``bootstrap`` chaining them as subflows.

Defaults that make Prefect work out of the box on a fresh machine are set here, before Prefect
is imported, and only where the user has not set them: a fresh ephemeral server needs more than
the default 20 s to start (shared/notes/dependencies.md §7), and telemetry cannot leave a
machine without network.
"""

import os

os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_ENABLED", "true")
