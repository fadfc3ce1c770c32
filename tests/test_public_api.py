"""The public API: one table of exports (``meshplan._EXPORTS`` plus :mod:`meshplan.errors`), the lazy lookups it
drives, and the ``TYPE_CHECKING`` block generated from it.

``python tests/test_public_api.py --write`` regenerates that block after ``_EXPORTS`` changed.
"""

import ast
import builtins
import re
import sys
from pathlib import Path

import meshplan
import meshplan.compat.errors
import meshplan.core.errors
import meshplan.errors

INIT = Path(meshplan.__file__)
BEGIN, END = "    # --- generated: begin ---\n", "    # --- generated: end ---\n"


def generated_block(exports: dict[str, tuple[str, ...]]) -> str:
    """The ``TYPE_CHECKING`` imports for ``exports`` and the errors, sorted as ruff's isort sorts them."""
    lines = [f"    from {module} import {name} as {name}\n" for module, names in exports.items() for name in names]
    lines.append("    from .errors import *  # noqa: F403 - every error class\n")
    return "".join(sorted(lines, key=lambda line: re.sub(r" (as|#) .*", "", line)))


def test_every_public_name_resolves():
    assert [name for name in meshplan.__all__ if getattr(meshplan, name, None) is None] == []


def test_unknown_attribute_is_an_attribute_error():
    try:
        meshplan.no_such_thing  # noqa: B018
    except AttributeError as exc:
        assert "no_such_thing" in str(exc)
    else:
        raise AssertionError("expected AttributeError")


def test_type_checking_block_is_generated_from_the_exports():
    """The block imports exactly ``_EXPORTS`` (re-exported, ``import X as X``) plus every error, so type
    checkers see the real types of the whole public API."""
    source = INIT.read_text()
    assert source[source.index(BEGIN) + len(BEGIN):source.index(END)] == generated_block(meshplan._EXPORTS), (
        "run: python tests/test_public_api.py --write")
    block = next(node for node in ast.parse(source).body
                 if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING")
    imported = {}
    for node in block.body:
        assert isinstance(node, ast.ImportFrom) and node.level == 1, ast.dump(node)
        for alias in node.names:
            if alias.name == "*":
                imported.update(dict.fromkeys(getattr(meshplan, node.module).__all__, f".{node.module}"))
            else:
                assert alias.asname == alias.name, f"{alias.name} is not re-exported"
                imported[alias.name] = f".{node.module}"
    assert imported == meshplan._LAZY


def test_every_error_is_public():
    """Every error class of the core is in ``meshplan.errors`` and at the top level; that includes the ones the
    README tells users to catch."""
    defined = {name for name, value in vars(meshplan.core.errors).items()
               if isinstance(value, type) and issubclass(value, meshplan.errors.MeshplanError)}
    assert set(meshplan.errors.__all__) == defined
    readme = (INIT.parent.parent / "README.md").read_text()
    mentioned = set(re.findall(r"`(\w+Error)`", readme)) - set(vars(builtins))
    assert "ExpertParallelError" in mentioned
    assert {name for name in mentioned if not hasattr(meshplan.errors, name)} == set()
    assert all(getattr(meshplan, name) is getattr(meshplan.errors, name) for name in defined)


def test_core_errors_have_no_reference_assertion_bases():
    """Only the NeMo drop-in's errors derive from ``AssertionError`` (asserts are for bugs, not user errors)."""
    assert [name for name in meshplan.errors.__all__
            if issubclass(getattr(meshplan.errors, name), AssertionError)] == []
    assert issubclass(meshplan.compat.errors.NemoTensorParallelSizeError, meshplan.errors.TensorParallelSizeError)
    assert issubclass(meshplan.compat.errors.NemoTensorParallelSizeError, AssertionError)


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    text = INIT.read_text()
    head, rest = text.split(BEGIN)
    INIT.write_text(head + BEGIN + generated_block(meshplan._EXPORTS) + END + rest.split(END, 1)[1])
