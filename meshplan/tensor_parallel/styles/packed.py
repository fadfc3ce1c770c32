"""Fused projections (``[q; k; v]``, ``[gate; up]``): every rank keeps its slice of *each* packed part.

Each rank's local weight is ``[a_r; b_r; ...]``. With equal parts the parameter is a ``_StridedShard`` DTensor (its
``full_tensor()`` is in the model's order) that the forward reads as a rank-major ``Shard`` view, so torch's
column- and row-wise computation runs unchanged; unequal parts (GQA ``[q; k; v]``) are stored rank-major with a
plain ``Shard`` and recorded (:mod:`meshplan.state.packing` holds both layouts and their conversions).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

from ...core.errors import PlanError
from ...state.packing import equal_parts, pack_rank_major, packed_placement, rank_major_view, record_packed
from .local_parameters import run_on_local_parameters
from .protocol import REPLICATED, ParamSplit, Placements, Style


class _Packed(Style):
    """Shared part of the packed styles: the part sizes, their checks and the in-place rank-major permutation of
    the Linear's parameters along :attr:`packed_dim` before torch's own split."""

    module_types = (nn.Linear,)
    shards_parameters = True
    #: the weight dim holding the packed parts; whether the bias is packed too (else replicated)
    packed_dim: ClassVar[int]
    packed_bias: ClassVar[bool]

    def _init_parts(self, sizes: Sequence[int] | None, parts: int) -> None:
        self.sizes = tuple(int(s) for s in sizes) if sizes is not None else None
        self.parts = len(self.sizes) if self.sizes is not None else int(parts)

    def _part_sizes(self, module: nn.Module) -> tuple[int, ...]:
        if not isinstance(module, nn.Linear):
            raise PlanError(f"{type(self).__name__} applies to nn.Linear, not {type(module).__name__}.")
        total = module.weight.shape[self.packed_dim]
        if self.sizes is None:
            if total % self.parts:
                raise PlanError(f"{type(self).__name__}: {total} features of {type(module).__name__} cannot be "
                                f"split in {self.parts} equal packed parts.")
            return (total // self.parts,) * self.parts
        if sum(self.sizes) != total:
            raise PlanError(f"{type(self).__name__}: packed part sizes {list(self.sizes)} add up to "
                            f"{sum(self.sizes)}, but {type(module).__name__} has {total} features.")
        return self.sizes

    def placements(self, module: nn.Module) -> Placements | None:
        sizes = self._part_sizes(module)
        bias = ParamSplit(0, sizes) if self.packed_bias else REPLICATED
        return {"weight": ParamSplit(self.packed_dim, sizes), **({"bias": bias} if module.bias is not None else {})}

    def check(self, module: nn.Module, tp_size: int) -> None:
        """:class:`PlanError` for a module that is no ``nn.Linear`` or whose parts do not divide by ``tp_size``."""
        sizes = self._part_sizes(module)
        if any(size % tp_size for size in sizes):
            raise PlanError(f"{type(self).__name__}: packed parts {list(sizes)} must each divide by the TP "
                            f"size {tp_size} so every rank keeps an equal slice of each part.")

    def parallelize(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        world = device_mesh.size()
        packed = {name: split for name, split in self.placements(module).items() if len(split.parts) > 1}
        with torch.no_grad():
            for name, split in packed.items():
                param = getattr(module, name)
                if param.device.type != "meta":  # torch's split below then gives rank r its [a_r; b_r]
                    param.copy_(pack_rank_major(param, split.parts, world, split.dim))
                if not equal_parts(split.parts):
                    record_packed(module, name, split.parts, world, split.dim)
        self.torch_apply(module, device_mesh)
        strided = [name for name, split in packed.items() if equal_parts(split.parts)]
        for name in strided:  # the same local tensor, described in the model's order
            param, split = module._parameters[name], packed[name]
            described = DTensor.from_local(param.detach().to_local(), device_mesh,
                                           [packed_placement(split.parts, split.dim)], run_check=False,
                                           shape=param.shape, stride=param.stride())
            module.register_parameter(name, nn.Parameter(described, requires_grad=param.requires_grad))
        if not strided:
            return module
        return run_on_local_parameters(module, lambda: [(module, name, rank_major_view) for name in strided])

    def __repr__(self) -> str:
        layouts = super().__repr__()  # torch's "Name(input_layouts=..., ...)"
        parts = f"sizes={list(self.sizes)}" if self.sizes is not None else f"parts={self.parts}"
        return f"{layouts[:-1]}, {parts})"


class PackedColwiseParallel(_Packed, ColwiseParallel):
    """Column-wise parallel for a Linear whose output features are packed parts (``sizes``, or ``parts``
    equal parts). The local output is ``[a_r, b_r, ...]``: the module sees its usual layout, per rank."""

    packed_dim, packed_bias = 0, True

    def __init__(self, sizes: Sequence[int] | None = None, *, parts: int = 2,
                 input_layouts: Placement | None = None) -> None:
        super().__init__(input_layouts=input_layouts)
        self._init_parts(sizes, parts)


class PackedRowwiseParallel(_Packed, RowwiseParallel):
    """Row-wise parallel for a Linear whose input features are packed parts; its input must be the local
    ``[a_r, b_r, ...]`` slice (as a :class:`PackedColwiseParallel` producer emits). Bias stays replicated."""

    packed_dim, packed_bias = 1, False

    def __init__(self, sizes: Sequence[int] | None = None, *, parts: int = 2,
                 output_layouts: Placement | None = None, use_local_output: bool = True) -> None:
        super().__init__(output_layouts=output_layouts, use_local_output=use_local_output)
        self._init_parts(sizes, parts)
