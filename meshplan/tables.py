"""Plain fixed-width text tables and human-readable numbers for command-line output."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]], indent: str = "") -> str:
    """A fixed-width table of ``rows`` with ``(key, header)`` columns (``None`` shows as empty)."""
    cells = [[str(row.get(key) if row.get(key) is not None else "") for key, _ in columns] for row in rows]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, (_, h) in enumerate(columns)]
    lines = ["  ".join(h.ljust(w) for (_, h), w in zip(columns, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(cell, widths)).rstrip() for cell in cells]
    return "\n".join(indent + line for line in lines)


def human_count(value: float) -> str:
    """``200261440`` -> ``"200.26 M"`` (decimal units: K, M, B, T)."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{value:.0f}"


def human_bytes(value: float) -> str:
    """``801045760`` -> ``"763.9 MiB"`` (binary units)."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(value) >= scale:
            return f"{value / scale:.1f} {unit}"
    return f"{value:.0f} B"
