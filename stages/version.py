"""The code version that goes into every version id: a hash of the code that shapes the data.

Only the pure packages count (flows/ and tasks/ orchestrate, they do not change rows), so a
change to a stage's logic gives new version ids and a change to Prefect wiring does not.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

PACKAGES = ("storage", "world", "models", "metrics", "stages", "rl", "training", "evaluation")
SUFFIXES = (".py", ".json", ".yaml")
RELEASE = "0.1.0"


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    top = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for pkg in PACKAGES:
        for path in sorted((top / pkg).rglob("*")):
            if path.suffix in SUFFIXES and "__pycache__" not in path.parts:
                h.update(str(path.relative_to(top)).encode())
                h.update(b"\0")
                h.update(path.read_bytes())
                h.update(b"\0")
    return f"{RELEASE}+{h.hexdigest()[:12]}"
