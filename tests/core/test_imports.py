import collections

import pytest

from meshplan import ImportPathError, import_class_from_path


@pytest.mark.parametrize("path", ["collections.OrderedDict", "collections:OrderedDict"])
def test_imports_by_dot_or_colon(path):
    assert import_class_from_path(path) is collections.OrderedDict


def test_nested_attribute_paths():
    assert import_class_from_path("collections:OrderedDict.fromkeys") == collections.OrderedDict.fromkeys
    assert import_class_from_path("os.path.join").__name__ == "join"


@pytest.mark.parametrize(("path", "fragment"), [
    ("no_such_pkg_xyz.Thing", "Cannot import module 'no_such_pkg_xyz'"),
    ("collections.NoSuchThing", "has no attribute 'NoSuchThing'"),
    ("justaname", "Malformed path"),
    ("", "Expected a dotted path"),
])
def test_errors_say_which_part_failed(path, fragment):
    with pytest.raises(ImportPathError, match=fragment):
        import_class_from_path(path)


def test_error_is_also_an_import_error():
    with pytest.raises(ImportError):
        import_class_from_path("no_such_pkg_xyz.Thing")
