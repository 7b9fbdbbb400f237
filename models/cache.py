"""Where derived model files live on this machine (downloaded checkpoints, warm starts)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def cache_root() -> Path:
    """``$AOT_CACHE`` (read at each call, so tests and users can point it elsewhere), else ~/.cache/aot."""
    return Path(os.environ.get("AOT_CACHE", Path.home() / ".cache" / "aot"))


@contextlib.contextmanager
def build_lock(path: Path):
    """Hold an exclusive lock for building ``path`` (a file lock beside it): concurrent builders —
    threads or processes, e.g. the evidence run's seeds — build once; the others wait here, then
    find it built. The OS drops the lock if its holder dies, so a crash never leaves others waiting."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
