import pytest

from meshplan.core.errors import ConflictError, UnknownNameError
from meshplan.core.registry import Provenance, Registration, Table, Tier, class_key, mro_keys


def reg(key, target, tier=Tier.PLUGIN, plugin="p", priority=0, override=False, aliases=()):
    return Registration("strategy", key, target, Provenance(plugin, tier), priority, override, aliases)


def test_names_are_case_insensitive_and_dash_equals_underscore():
    table = Table("strategy")
    table.add(reg("Megatron_FSDP", "a.b:C", aliases=("nvfsdp",)))
    for name in ("megatron-fsdp", "MEGATRON_fsdp", "NVFSDP"):
        assert table.get(name).target == "a.b:C"


def test_identical_duplicate_is_a_no_op():
    table = Table("strategy")
    table.add(reg("x", "a.b:C", plugin="one"))
    table.add(reg("x", "a.b:C", plugin="two"))
    assert table.get("x").target == "a.b:C"


def test_same_precedence_conflict_names_both_plugins_and_only_when_requested():
    table = Table("strategy")
    table.add(reg("x", "a:One", plugin="first"))
    table.add(reg("x", "b:Two", plugin="second"))
    table.add(reg("y", "c:Three", plugin="third"))
    assert table.get("y").target == "c:Three"
    with pytest.raises(ConflictError, match="first.*second|second.*first"):
        table.get("x")


def test_replacing_needs_override_regardless_of_load_order():
    for order in ((0, 1), (1, 0)):
        table = Table("strategy")
        regs = [reg("x", "builtin:X", tier=Tier.BUILTIN, plugin="builtin"), reg("x", "plug:X", plugin="plug")]
        for i in order:
            table.add(regs[i])
        with pytest.raises(ConflictError, match="override=True"):
            table.get("x")
    table.add(reg("x", "plug:Y", plugin="other", override=True, priority=5))
    assert table.get("x").target == "plug:Y"


def test_precedence_runtime_over_priority_over_builtin():
    table = Table("strategy")
    table.add(reg("x", "builtin:X", tier=Tier.BUILTIN))
    table.add(reg("x", "plug:lo", override=True, priority=1, plugin="lo"))
    table.add(reg("x", "plug:hi", override=True, priority=9, plugin="hi"))
    assert table.get("x").target == "plug:hi"
    table.add(reg("x", "rt:X", tier=Tier.RUNTIME, override=True))
    assert table.get("x").target == "rt:X"


def test_unknown_name_lists_known_and_suggests():
    table = Table("strategy")
    table.add(reg("fsdp2", "a:B"))
    with pytest.raises(UnknownNameError, match="Did you mean 'fsdp2'"):
        table.get("fsdp3")


def test_mro_keys_qualified_then_bare():
    class Base:
        pass

    class Child(Base):
        pass

    keys = [k for _, k in mro_keys(Child)]
    assert keys[0] == class_key(Child) and keys[1] == "Child"
    assert keys.index(class_key(Base)) < keys.index("Base") < keys.index("builtins.object")
