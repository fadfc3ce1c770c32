"""The dry run behind ``meshplan explain``: the real parallelize path for any world size, on one CPU.

>>> report = explain("llama3-8b", "dp_shard=8,tp=8")      # a JSON-ready dict, see docs/explain.md
>>> print(render_text(report))
"""

from __future__ import annotations

from .render import render_text
from .run import PRECISIONS, SCHEMA, explain

__all__ = ["PRECISIONS", "SCHEMA", "explain", "render_text"]
