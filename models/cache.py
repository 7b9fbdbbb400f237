"""Where derived model files live on this machine (downloaded checkpoints, warm starts)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$AOT_CACHE`` (read at each call, so tests and users can point it elsewhere), else ~/.cache/aot."""
    return Path(os.environ.get("AOT_CACHE", Path.home() / ".cache" / "aot"))
