"""The ``meshplan`` command line: listings, ``explain``, ``demo`` and launching. It sits on top: mesh specs and
model sources come from :mod:`meshplan.dryrun`, tables from :mod:`meshplan.tables`; nothing imports this package."""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``meshplan`` console script (imports the CLI on call)."""
    from .main import main as run  # loaded on use: keeps start-up light

    return run(argv)
