"""What every typed config is made of: a validated dataclass, and fields with their help text.

Help says what a field does and where its default comes from (TRL's convention); ``aot config``
and the docs read it from the field metadata. The classes are pydantic dataclasses: plain
dataclasses to the code that uses them (``dataclasses.replace``, ``asdict``), type-checked by
pydantic when built from a preset or from ``--set`` overrides, with unknown keys refused.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Annotated, Any

from pydantic import BeforeValidator, ConfigDict
from pydantic.dataclasses import dataclass as _pydantic_dataclass


def settings(cls):
    """A config section: a dataclass whose fields pydantic checks and which refuses unknown keys."""
    return _pydantic_dataclass(cls, config=ConfigDict(extra="forbid"))


def documented(default: Any, help: str) -> Any:
    """A field with ``help`` metadata; mutable defaults (lists, dicts, dataclasses) are copied per instance."""
    if isinstance(default, (list, dict, set)) or dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def _integer(value: Any) -> Any:
    # pydantic would read true as 1; a count given as true/false is a mistake, a whole float is not
    if isinstance(value, bool):
        raise ValueError("expected an integer, not true/false")
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


Int = Annotated[int, BeforeValidator(_integer)]
