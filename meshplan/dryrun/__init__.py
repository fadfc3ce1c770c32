"""The dry run behind ``meshplan explain``: the real parallelize path for any world size, on one CPU.

>>> report = explain("llama3-8b", "dp_shard=8,tp=8")      # a JSON-ready dict, see docs/explain.md
>>> print(render_text(report))

The names below load on first use, so that ``meshplan presets`` (which needs only :mod:`.modelsource`) imports
neither torch's distributed packages nor the api.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .render import render_text
    from .run import PRECISIONS, SCHEMA, explain

_HOMES = {"PRECISIONS": ".run", "SCHEMA": ".run", "explain": ".run", "render_text": ".render"}

__all__ = ["PRECISIONS", "SCHEMA", "explain", "render_text"]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name], __name__), name)
