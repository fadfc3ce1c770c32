"""A module kept whole on purpose, and several styles on one module."""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import ParallelStyle

from .protocol import Placements, Style
from .traits import traits_of


class KeepReplicated(Style):
    """The module stays as it is on every rank (transformers' ``replicate``); listed in the plan report."""

    def parallelize(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        return module

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class ChainedStyles(Style):
    """Apply several styles to the same module, in order; it answers the protocol for all of them."""

    def __init__(self, *styles: ParallelStyle) -> None:
        super().__init__()
        self.styles = tuple(styles)

    @property
    def module_types(self) -> tuple[type[nn.Module], ...] | None:  # type: ignore[override]
        """The types every part accepts (``None``: any)."""
        declared = [types for types in (traits_of(s).module_types for s in self.styles) if types is not None]
        if not declared:
            return None
        return tuple(dict.fromkeys(t for types in declared for t in types
                                   if all(issubclass(t, other) for other in declared)))

    @property
    def shards_parameters(self) -> bool:  # type: ignore[override]
        return any(traits_of(s).shards_parameters for s in self.styles)

    def placements(self, module: nn.Module) -> Placements | None:
        """The parts' placements; ``None`` for a parameter two parts place (known only after applying them)."""
        merged: dict = {}
        for style in self.styles:
            placements = traits_of(style).placements(module)
            if placements is None:
                return None
            for name, split in placements.items():
                merged[name] = None if name in merged else split
        return merged

    def check(self, module: nn.Module, tp_size: int) -> None:
        """Each part's check (before any collective)."""
        for style in self.styles:
            traits_of(style).check(module, tp_size)

    def whole_reason(self, module: nn.Module, tp_size: int) -> str | None:
        """The first part's reason to keep the module whole."""
        reasons = (traits_of(style).whole_reason(module, tp_size) for style in self.styles)
        return next((reason for reason in reasons if reason is not None), None)

    def parallelize(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        for style in self.styles:
            module = style._apply(module, device_mesh)
        return module

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(map(repr, self.styles))})"
