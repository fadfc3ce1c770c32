"""The ``meshplan`` command line and its tools: listings, ``explain``, ``demo``, launching, mesh specs,
model sources. Nothing in :mod:`meshplan.core` imports this package."""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``meshplan`` console script (imports the CLI on call)."""
    from .main import main as run

    return run(argv)
