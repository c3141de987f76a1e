"""Turning event fields into JSON values that mean the same thing to a reader."""

from __future__ import annotations

import dataclasses
import math
from enum import Enum
from typing import Any

# Integers beyond this lose precision in JavaScript-based viewers (Perfetto), so they are written as hex.
MAX_EXACT_INT = 1 << 53
_PLAIN = (str, bool, type(None))


def to_jsonable(value: Any) -> Any:
    """A JSON-native equivalent of ``value``: large ints as hex strings, enums by name, bytes as hex,
    dataclasses as dicts, sets as sorted lists, anything else as its ``str``."""
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, Enum):  # before int: an IntEnum is an int
        return value.name
    if isinstance(value, int):
        return int(value) if -MAX_EXACT_INT <= value <= MAX_EXACT_INT else hex(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    if isinstance(value, dict):
        return {str(to_jsonable(key)): to_jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(item) for item in value]
    if isinstance(value, set | frozenset):
        return sorted((to_jsonable(item) for item in value), key=repr)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return str(value)
