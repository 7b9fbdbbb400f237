"""Fault injection for integration tests and drills: ``AOT_FAULT=stage:index:mode``.

Modes:
- ``kill``: the process dies (``os._exit(137)``) when it reaches that shard, as under an OOM
  killer or a lost node: nothing of that shard is written, earlier shards stay.
- ``transient``: the first attempt at that shard raises ``ConnectionError`` (retried with
  backoff); a marker under ``ROOT/_faults/`` makes later attempts succeed.
- ``error``: every attempt raises ``RuntimeError`` (not retried): the flow fails at that shard.

Several faults may be given, separated by commas. Unset in normal runs. The shard runner
(stages/runner.py) calls it, so a drill works the same with and without Prefect.
"""

from __future__ import annotations

import os

from storage import ShardStore


def maybe_inject(stage: str, index: int, store: ShardStore) -> None:
    spec = os.environ.get("AOT_FAULT", "")
    for item in filter(None, (s.strip() for s in spec.split(","))):
        f_stage, f_index, mode = (item.split(":") + ["error"])[:3]
        if f_stage != stage or int(f_index) != index:
            continue
        if mode == "kill":
            os._exit(137)
        if mode == "transient":
            marker = store.path("_faults", f"{stage}-{index}")
            if not store.fs.exists(marker):
                store.fs.makedirs(store.path("_faults"), exist_ok=True)
                store.fs.pipe_file(marker, b"1")
                raise ConnectionError(f"injected transient fault at {stage} shard {index}")
            continue
        raise RuntimeError(f"injected fault at {stage} shard {index}")
