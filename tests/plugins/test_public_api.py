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
