"""Option values as deterministic JSON: numbers, strings and lists stay themselves, the rest reads as text.

``torch.float32`` becomes ``"float32"``; dataclasses such as FSDP2's ``MixedPrecisionPolicy`` become
``"MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32, ...)"``; functions and classes their
dotted path; enums their name. Nothing carries an object address, so two runs give the same report.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import re
from collections.abc import Mapping
from typing import Any

import torch

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _text(value: Any) -> str:
    """A readable one-line description of ``value`` (the same in every run)."""
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = ", ".join(f"{f.name}={_text(getattr(value, f.name))}" for f in dataclasses.fields(value))
        return f"{type(value).__name__}({fields})"
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, type) or callable(value) and hasattr(value, "__qualname__"):
        return f"{getattr(value, '__module__', '?')}.{value.__qualname__}"
    return _ADDRESS.sub("", repr(value))


def json_value(value: Any) -> Any:
    """``value`` as a JSON value: JSON scalars and containers as they are, anything else as readable text."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, (list, tuple)):
        return [json_value(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted((json_value(v) for v in value), key=repr)
    if isinstance(value, Mapping):
        return {str(k): json_value(v) for k, v in value.items()}
    return _text(value)
