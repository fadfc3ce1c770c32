"""Strategy options are checked once against their dataclass's declared types (meshplan.core.options)."""

from __future__ import annotations

import subprocess
import sys
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Optional

import pytest
import torch

import meshplan
from meshplan import OptionsError
from meshplan.core.options import check_option_types, option_checks
from meshplan.core.strategy import StrategyOptions

if TYPE_CHECKING:
    from torch.distributed.fsdp import MixedPrecisionPolicy
    from torch.distributed.fsdp import OffloadPolicy as Offload


@pytest.mark.parametrize("strategy", ["fsdp2", "ddp", "megatron_fsdp"])
def test_a_string_for_a_bool_is_refused_by_every_strategy(strategy):
    with pytest.raises(OptionsError) as info:
        meshplan.get_strategy(strategy).make_options({"sequence_parallel": "false"})
    message = str(info.value)
    assert "'sequence_parallel'" in message and "must be bool" in message and "'false'" in message
    assert strategy in message


@dataclass
class Declared(StrategyOptions):
    """Every annotation form the checker understands (strings: this module imports annotations)."""

    policy: MixedPrecisionPolicy | None = None
    every: int = 2
    scale: float = 1.0
    names: Sequence[str | type] | None = None
    mode: Literal["a", "b"] = "a"
    maybe: Optional[str] = None  # noqa: UP045 - the spelling under test
    dtype: torch.dtype = torch.float32
    anything: Any = None
    kind: type[torch.nn.Module] | None = None
    offload: Offload | None = None  # a name bound only for type checkers, under an alias


@pytest.mark.parametrize(("name", "good", "bad"), [
    ("policy", "MixedPrecisionPolicy", "bf16"),
    ("every", 3, True),
    ("scale", 2, "2"),
    ("names", ("torch.nn.Linear", torch.nn.Linear), "torch.nn.Linear"),
    ("mode", "b", "c"),
    ("maybe", "x", 1),
    ("dtype", torch.bfloat16, "bf16"),
    ("kind", torch.nn.Linear, torch.nn.Linear(1, 1)),
    ("offload", "CPUOffloadPolicy", "cpu"),
])
def test_declared_types_accept_and_refuse(name, good, bad):
    if good in ("MixedPrecisionPolicy", "CPUOffloadPolicy"):
        import torch.distributed.fsdp

        good = getattr(torch.distributed.fsdp, good)()
    check_option_types(Declared(**{name: good}), "test")
    with pytest.raises(OptionsError, match=rf"Option '{name}' of strategy 'test' must be "):
        check_option_types(Declared(**{name: bad}), "test")


def test_anything_goes_for_any_and_run_time_annotations_work():
    check_option_types(Declared(anything=object()), "test")
    run_time = typing.get_type_hints(StrategyOptions)
    assert run_time["strict"] is bool

    @dataclass
    class Plain:  # annotations as objects, not strings
        flag: bool = True
        count: int | None = None

    Plain.__annotations__.update(flag=bool, count=int | None)
    Plain.__dataclass_fields__["flag"].type, Plain.__dataclass_fields__["count"].type = bool, int | None
    check_option_types(Plain(count=None), "plain")
    with pytest.raises(OptionsError, match="must be bool"):
        check_option_types(Plain(flag="yes"), "plain")
    assert option_checks(Plain) is option_checks(Plain)  # computed once per class


def test_checking_fsdp2_options_imports_no_fsdp():
    code = ("import sys, meshplan; meshplan.get_strategy('fsdp2').make_options({'reshard_after_forward': False}); "
            "print('torch.distributed.fsdp' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


class Sink(typing.Protocol):  # not runtime-checkable: isinstance() refuses it
    def write(self, text: str) -> None: ...


@dataclass
class WithProtocols(StrategyOptions):
    sink: Sink | None = None
    number: typing.SupportsInt | None = None  # runtime-checkable: checked


def test_a_protocol_that_cannot_be_checked_is_accepted():
    check_option_types(WithProtocols(sink=object(), number=3), "test")
    with pytest.raises(OptionsError, match="'number'"):
        check_option_types(WithProtocols(number="x"), "test")
