"""Summarize module names of repeated layers, losslessly: ``model.layers.{0..125}.mlp.up_proj``.

Names that differ only in numeric path segments are grouped; each numeric position becomes a brace
set of ranges (``{0..3,6,8..9}``). A group is written as one pattern only when it is the full product of
its positions' sets; otherwise it is split on the first position, so expanding the patterns gives back
exactly the input names.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from itertools import product

_NUMBER = re.compile(r"^\d+$")


def format_ranges(values: Iterable[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``"0..2,5,7..8"``."""
    ordered = sorted(set(values))
    runs: list[str] = []
    start = prev = ordered[0]
    for value in ordered[1:] + [None]:  # type: ignore[operator]
        if value is not None and value == prev + 1:
            prev = value
            continue
        runs.append(str(start) if start == prev else f"{start}..{prev}")
        if value is not None:
            start = prev = value
    return ",".join(runs)


def _brace(values: set[int]) -> str:
    return str(next(iter(values))) if len(values) == 1 else "{" + format_ranges(values) + "}"


def _compress(template: list[str], slots: Sequence[int], tuples: set[tuple[int, ...]]) -> list[tuple[str, int]]:
    """Patterns (with counts) for the numeric ``tuples`` filling ``slots`` of ``template``."""
    if not slots:
        return [(".".join(template), 1)]
    # Group the first slot's values by the set of remainders they come with; each group is then
    # exact in its first slot, and the remainders are compressed the same way.
    by_first: dict[int, set[tuple[int, ...]]] = {}
    for t in tuples:
        by_first.setdefault(t[0], set()).add(t[1:])
    groups: dict[frozenset[tuple[int, ...]], set[int]] = {}
    for first, rest in sorted(by_first.items()):
        groups.setdefault(frozenset(rest), set()).add(first)
    patterns: list[tuple[str, int]] = []
    for rest, firsts in groups.items():
        fixed = list(template)
        fixed[slots[0]] = _brace(firsts)
        patterns += [(p, n * len(firsts)) for p, n in _compress(fixed, slots[1:], set(rest))]
    return patterns


def summarize_names(names: Iterable[str]) -> list[dict[str, object]]:
    """``[{"pattern": "model.layers.{0..31}.mlp", "count": 32}, ...]`` in order of first appearance."""
    groups: dict[tuple[str, ...], set[tuple[int, ...]]] = {}
    for name in names:
        parts = name.split(".") if name else [""]
        template = tuple("*" if _NUMBER.match(p) else p for p in parts)
        groups.setdefault(template, set()).add(tuple(int(p) for p in parts if _NUMBER.match(p)))
    summary: list[dict[str, object]] = []
    for template, tuples in groups.items():
        slots = [i for i, part in enumerate(template) if part == "*"]
        summary += [{"pattern": p, "count": n} for p, n in _compress(list(template), slots, tuples)]
    return summary


def expand_pattern(pattern: str) -> list[str]:
    """The names a summarized pattern stands for (the inverse of :func:`summarize_names`)."""
    pieces = re.split(r"(\{[^}]*\})", pattern)
    choices: list[list[str]] = []
    for piece in pieces:
        if piece.startswith("{"):
            values: list[str] = []
            for run in piece[1:-1].split(","):
                a, _, b = run.partition("..")
                values += [str(v) for v in range(int(a), int(b or a) + 1)]
            choices.append(values)
        else:
            choices.append([piece])
    return ["".join(combo) for combo in product(*choices)]
