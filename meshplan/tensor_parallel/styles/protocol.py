"""The protocol every tensor-parallel style answers, and the base meshplan's styles (and plugins') build on.

Validation (:mod:`meshplan.tensor_parallel.validation`), ``explain`` and the state code never branch on a style's
class: they ask :func:`~meshplan.tensor_parallel.styles.traits.traits_of` for the style's :class:`StyleTraits`:

* :attr:`~StyleTraits.module_types`: the module types it can be applied to (``None``: any);
* :attr:`~StyleTraits.shards_parameters`: whether it may shard parameters of the module (not only move
  activations or keep the module whole);
* :meth:`~StyleTraits.placements`: what each parameter of a module becomes (:class:`ParamSplit`, by name relative
  to the module; ``None`` when it cannot be known without applying the style);
* :meth:`~StyleTraits.check`: typed errors for a module and TP size it cannot handle, before any collective;
* :meth:`~StyleTraits.whole_reason`: why a module stays whole at a TP size (the plan is fitted without it).

:class:`Style` implements the protocol with neutral answers and is torch's ``ParallelStyle``: its ``_apply``, the
only override of torch's private hook in meshplan, runs :meth:`Style.check` and then :meth:`Style.parallelize`,
which a subclass writes. A style that declares its placements gets its parameters distributed by
:meth:`Style.distribute_parameters` (packed parameters as :func:`~meshplan.state.packing.packed_placement` says).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol, runtime_checkable

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ParallelStyle

from ...state.packing import equal_parts, pack_rank_major, packed_placement, record_packed


@dataclass(frozen=True)
class ParamSplit:
    """What tensor parallelism makes of one parameter: ``Shard(dim)``, each rank keeping an equal slice of each
    packed part (``parts``: their sizes along ``dim``, stored rank-major); or ``dim=None``: replicated, and
    ``summand``: added to a partial sum, so each rank adds ``1 / tp`` of it."""

    dim: int | None
    parts: tuple[int, ...] = ()
    summand: bool = False

    def placement(self) -> str:
        """The placement as text (``"packed Shard(0)"`` for packed parts), as reports show it."""
        if self.dim is None:
            return str(Replicate())
        return ("packed " if len(self.parts) > 1 else "") + str(Shard(self.dim))


REPLICATED, SUMMAND = ParamSplit(None), ParamSplit(None, summand=True)
COLUMNS, ROWS = ParamSplit(0), ParamSplit(1)

#: ``{parameter name relative to the module: its split}``; a ``None`` split: not known before applying
Placements = Mapping[str, "ParamSplit | None"]


@runtime_checkable
class StyleTraits(Protocol):
    """What a tensor-parallel style says about itself (see the module docstring)."""

    module_types: tuple[type[nn.Module], ...] | None
    shards_parameters: bool

    def placements(self, module: nn.Module) -> Placements | None:
        """What each parameter of ``module`` becomes (parameters not named stay unsharded); ``None``: unknown."""

    def check(self, module: nn.Module, tp_size: int) -> None:
        """Raise a typed error when the style cannot handle ``module`` at ``tp_size`` (no collective)."""

    def whole_reason(self, module: nn.Module, tp_size: int) -> str | None:
        """Why ``module`` stays whole (unsharded) at ``tp_size``, or ``None`` when the style applies."""


def distribute_parameter(owner: nn.Module, name: str, mesh: DeviceMesh, dim: int | None,
                         parts: Sequence[int] = ()) -> None:
    """Replace ``owner``'s parameter ``name`` by a DTensor on ``mesh``: replicated when ``dim`` is ``None``, else
    ``Shard(dim)``; with ``parts`` (more than one) each rank keeps its slice of each part
    (:func:`~meshplan.state.packing.packed_placement`: ``_StridedShard`` for equal parts, else packed rank-major
    and recorded). A DTensor stays."""
    param = owner._parameters[name]
    if isinstance(param, DTensor):
        return
    data = param.detach()
    placement = Replicate() if dim is None else packed_placement(parts, dim) if len(parts) > 1 else Shard(dim)
    if len(parts) > 1 and not equal_parts(parts):
        if data.device.type != "meta":
            data = pack_rank_major(data, parts, mesh.size(), dim)
        record_packed(owner, name, parts, mesh.size(), dim)
    sharded = distribute_tensor(data, mesh, [placement])
    owner.register_parameter(name, nn.Parameter(sharded, requires_grad=param.requires_grad))


class Style(ParallelStyle):
    """Base of meshplan's styles: the protocol with neutral answers (any module, no parameter sharded, nothing to
    check, never kept whole) and the one ``_apply`` torch calls. Subclasses override what differs and write
    :meth:`parallelize`; a style extending one of torch's calls :meth:`torch_apply` for torch's own part."""

    module_types: ClassVar[tuple[type[nn.Module], ...] | None] = None
    shards_parameters: ClassVar[bool] = False

    def placements(self, module: nn.Module) -> Placements | None:
        return {}

    def check(self, module: nn.Module, tp_size: int) -> None:
        return None

    def whole_reason(self, module: nn.Module, tp_size: int) -> str | None:
        return None

    def parallelize(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        """Parallelize ``module`` on ``device_mesh`` (already checked); returns the module."""
        raise NotImplementedError(f"{type(self).__name__} does not define parallelize(module, device_mesh).")

    def torch_apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        """The ``_apply`` of the torch style this one extends (``ColwiseParallel``, ...), next in the MRO."""
        return super()._apply(module, device_mesh)

    def distribute_parameters(self, module: nn.Module, device_mesh: DeviceMesh) -> None:
        """Make each parameter :meth:`placements` names (dotted: a descendant's) a DTensor on ``device_mesh``."""
        for name, split in (self.placements(module) or {}).items():
            if split is not None:
                owner, _, own = name.rpartition(".")
                distribute_parameter(module.get_submodule(owner), own, device_mesh, split.dim,
                                     split.parts if split.dim is not None else ())

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        self.check(module, device_mesh.size())
        return self.parallelize(module, device_mesh)
