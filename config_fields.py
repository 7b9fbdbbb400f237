"""The one helper every typed config uses: a dataclass field with its help text.

Help says what the field does and where its default comes from (TRL's convention); ``aot
config`` and the docs read it from the field metadata.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any


def documented(default: Any, help: str) -> Any:
    """A field with ``help`` metadata; mutable defaults (lists, dicts, dataclasses) are copied per instance."""
    if isinstance(default, (list, dict, set)) or dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})
