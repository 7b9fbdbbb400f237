"""Content hashes: the identity of every version, shard and cache key."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace, so equal content gives equal text.

    Floats go through ``repr`` (json's default), which round-trips exactly; tuples become lists.
    """
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=_default)


def _default(obj: Any) -> Any:
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    raise TypeError(f"cannot hash a value of type {type(obj).__name__}: {obj!r}")


def content_hash(obj: Any, length: int = 16) -> str:
    """Hex sha256 of the canonical JSON of ``obj``, cut to ``length`` characters.

    16 hex characters (64 bits) keep ids short in paths and UIs; a collision needs ~4e9 versions.
    """
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:length]


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
