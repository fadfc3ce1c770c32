import meshplan


def test_every_public_name_resolves():
    assert [name for name in meshplan.__all__ if getattr(meshplan, name, None) is None] == []


def test_unknown_attribute_is_an_attribute_error():
    try:
        meshplan.no_such_thing  # noqa: B018
    except AttributeError as exc:
        assert "no_such_thing" in str(exc)
    else:
        raise AssertionError("expected AttributeError")


def test_type_checking_imports_mirror_the_lazy_table():
    """``meshplan/__init__.py``'s ``if TYPE_CHECKING:`` block imports exactly the lazy names from their
    modules, re-exported (``import X as X``), so type checkers see the real types of the public API."""
    import ast
    from pathlib import Path

    tree = ast.parse(Path(meshplan.__file__).read_text())
    block = next(node for node in tree.body if isinstance(node, ast.If) and getattr(node.test, "id", "") ==
                 "TYPE_CHECKING")
    imported = {}
    for node in block.body:
        assert isinstance(node, ast.ImportFrom) and node.level == 1, ast.dump(node)
        for alias in node.names:
            assert alias.asname == alias.name, f"{alias.name} is not re-exported"
            imported[alias.name] = f".{node.module}"
    assert imported == meshplan._LAZY
