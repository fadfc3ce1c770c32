"""The ``meshplan`` command line: plugin/strategy/plan listings (tables or ``--json``) and subcommands."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from .core.errors import MeshplanError


def _table(rows: list[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """A plain fixed-width text table of ``rows`` with ``(key, header)`` columns."""
    cells = [[str(row.get(key) if row.get(key) is not None else "") for key, _ in columns] for row in rows]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, (_, h) in enumerate(columns)]
    lines = ["  ".join(h.ljust(w) for (_, h), w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(cell, widths)).rstrip() for cell in cells]
    return "\n".join(lines)


def _plugins_rows() -> list[dict[str, Any]]:
    from .plugins.api import list_plugins

    rows = list_plugins()
    for row in rows:
        row["provides"] = ", ".join(f"{c['kind']}:{c['key']}" for c in row["contributions"])
    return rows


def _strategies_rows() -> list[dict[str, Any]]:
    from .plugins.api import list_strategies

    rows = list_strategies()
    for row in rows:
        row["aliases_text"] = ", ".join(row["aliases"])
        row["available"] = "yes" if not row.get("unavailable_reason") else f"no: {row['unavailable_reason']}"
        row["options_text"] = ", ".join(f"{o['name']}={o['default']}" for o in row.get("options", []))
    return rows


def _plans_rows() -> list[dict[str, Any]]:
    from .plugins.api import list_tp_plans

    return list_tp_plans()


def _styles_rows() -> list[dict[str, Any]]:
    from .plugins.api import list_styles

    return list_styles()


LISTINGS: dict[str, tuple[str, Callable[[], list[dict[str, Any]]], Sequence[tuple[str, str]]]] = {
    "plugins": ("installed plugins and what they provide", _plugins_rows, (
        ("name", "plugin"), ("source", "source"), ("status", "status"), ("distribution", "distribution"),
        ("version", "version"), ("provides", "provides"), ("error", "error"))),
    "strategies": ("registered parallel strategies", _strategies_rows, (
        ("name", "strategy"), ("aliases_text", "aliases"), ("plugin", "plugin"), ("status", "status"),
        ("available", "available here"), ("options_text", "options (defaults)"))),
    "plans": ("registered tensor-parallel plan providers", _plans_rows, (
        ("model_class", "model class"), ("target", "provider"), ("plugin", "plugin"), ("status", "status"))),
    "styles": ("registered parallel-style names", _styles_rows, (
        ("name", "style"), ("target", "factory"), ("plugin", "plugin"), ("status", "status"))),
}


def _run_listing(name: str, as_json: bool) -> int:
    _, rows_fn, columns = LISTINGS[name]
    rows = rows_fn()
    if as_json:
        print(json.dumps(rows, indent=2, default=str))
    else:
        print(_table(rows, columns))
    return 0


#: Extra subcommands: name -> (help, add-arguments, run). Modules add theirs here.
SUBCOMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshplan", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, _, _) in LISTINGS.items():
        p = sub.add_parser(name, help=f"list {help_text}")
        p.add_argument("--json", action="store_true", help="machine-readable output")
    for name, (help_text, add_arguments, _) in _subcommands().items():
        add_arguments(sub.add_parser(name, help=help_text))
    return parser


def _subcommands() -> dict[str, tuple[str, Callable[[argparse.ArgumentParser], None],
                                      Callable[[argparse.Namespace], int]]]:
    """Subcommands beyond the listings, imported lazily so listings stay fast."""
    return dict(SUBCOMMANDS)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command in LISTINGS:
            return _run_listing(args.command, args.json)
        return _subcommands()[args.command][2](args)
    except MeshplanError as exc:
        print(f"meshplan: error: {exc}", file=sys.stderr)
        return 2
