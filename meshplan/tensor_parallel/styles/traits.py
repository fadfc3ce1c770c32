"""Every style's answers to the protocol (:class:`~.protocol.StyleTraits`), and the queries validation asks.

A style implementing the protocol (a :class:`~.protocol.Style`, or a plugin's ``ParallelStyle`` with the same
attributes) answers for itself. torch's own styles are described here, by the class whose ``_apply`` a style
runs: a subclass keeping torch's ``_apply`` is what torch's class is, one with its own ``_apply`` is unknown. Any
other style gets the unknown answers: any module, placements not known before applying it.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    PrepareModuleInputOutput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
)

from ...core.errors import PlanError, StyleModuleTypeError
from .protocol import REPLICATED, ParamSplit, Placements, StyleTraits


class UnknownStyleTraits:
    """The answers for a style that does not describe itself: any module, unknown placements, no checks."""

    module_types: tuple[type[nn.Module], ...] | None = None
    shards_parameters = False

    def __init__(self, style: ParallelStyle) -> None:
        self.style = style

    def placements(self, module: nn.Module) -> Placements | None:
        return None

    def check(self, module: nn.Module, tp_size: int) -> None:
        return None

    def whole_reason(self, module: nn.Module, tp_size: int) -> str | None:
        return None


class ActivationTraits(UnknownStyleTraits):
    """torch's ``PrepareModuleInput`` / ``Output`` / ``InputOutput``: activations move, parameters stay."""

    def placements(self, module: nn.Module) -> Placements | None:
        return {}


class SequenceParallelTraits(UnknownStyleTraits):
    """torch's ``SequenceParallel``: the module's own parameters become replicated DTensors."""

    def placements(self, module: nn.Module) -> Placements | None:
        return {name: REPLICATED for name, _ in module.named_parameters(recurse=False)}


class LinearSplitTraits(UnknownStyleTraits):
    """torch's ``ColwiseParallel`` / ``RowwiseParallel`` on an ``nn.Linear`` or ``nn.Embedding``."""

    module_types = (nn.Linear, nn.Embedding)
    shards_parameters = True
    #: dim of a Linear weight, its bias's split, dim of an Embedding's parameters
    weight_dim, bias, embedding_dim = 0, ParamSplit(0), 1

    def placements(self, module: nn.Module) -> Placements | None:
        own = [name for name, _ in module.named_parameters(recurse=False)]
        if isinstance(module, nn.Embedding):
            return {name: ParamSplit(self.embedding_dim) for name in own}
        splits = {"weight": ParamSplit(self.weight_dim), "bias": self.bias}
        return {name: splits.get(name) for name in own}


class RowwiseTraits(LinearSplitTraits):
    weight_dim, bias, embedding_dim = 1, REPLICATED, 0


#: torch's style classes (each defining ``_apply``) -> their answers
TORCH_STYLE_TRAITS: dict[type[ParallelStyle], Callable[[ParallelStyle], StyleTraits]] = {
    ColwiseParallel: LinearSplitTraits,
    RowwiseParallel: RowwiseTraits,
    SequenceParallel: SequenceParallelTraits,
    PrepareModuleInput: ActivationTraits,
    PrepareModuleOutput: ActivationTraits,
    PrepareModuleInputOutput: ActivationTraits,
}


def traits_of(style: ParallelStyle) -> StyleTraits:
    """The style's answers to the protocol (see the module docstring)."""
    if isinstance(style, StyleTraits):
        return style
    runs = next((cls for cls in type(style).__mro__ if "_apply" in vars(cls)), None)
    return TORCH_STYLE_TRAITS.get(runs, UnknownStyleTraits)(style)


def shards_parameters(style: ParallelStyle) -> bool:
    """Whether ``style`` may shard parameters of the module it is applied to (or of its descendants)."""
    return traits_of(style).shards_parameters


def check_module_type(style: ParallelStyle, module: nn.Module, fqn: str) -> None:
    """Raise :class:`StyleModuleTypeError` naming ``fqn`` when ``style`` cannot be applied to its type."""
    supported = traits_of(style).module_types
    if supported is not None and not isinstance(module, supported):
        kinds = " or ".join(f"nn.{t.__name__}" for t in supported)
        raise StyleModuleTypeError(
            f"{type(style).__name__} cannot shard module {fqn!r} of type {type(module).__qualname__}: it "
            f"handles {kinds} (and their subclasses) only. Leave {fqn!r} out of the plan, convert the "
            "module to nn.Linear, or register a style for its type with meshplan.register_style(...).")


def predicted_placement(style: ParallelStyle | None, module: nn.Module, param_name: str) -> str | None:
    """The TP placement ``style`` will give ``module``'s parameter ``param_name``, as text.

    ``"unsharded"`` when the style leaves it alone (or there is no style); ``None`` when it cannot be known
    without applying the style. Used to refuse tied parameters that would be split differently.
    """
    if style is None:
        return "unsharded"
    try:
        placements = traits_of(style).placements(module)
    except PlanError:  # the style does not fit the module: validation reports it
        return None
    if placements is None:
        return None
    if param_name not in placements:
        return "unsharded"
    split = placements[param_name]
    return None if split is None else split.placement()
