"""Styles that leave parameters whole and adjust what a module's forward computes with: its head counts, the
gradient of the rotary slice of multi-head latent attention's ``kv_a_proj_with_mqa``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from ...core.errors import PlanError, TensorParallelSizeError
from .gradients import all_reduce_backward
from .protocol import Style


class LocalHeadCount(Style):
    """Divides the module's integer head-count attributes (``attributes``, default ``num_heads``) by the TP size:
    for a module whose forward reshapes by its own head count (``view(..., self.num_heads, -1)``) while its
    column-wise projections give it this rank's heads only. :meth:`check` refuses a count that does not divide."""

    def __init__(self, attributes: Sequence[str] = ("num_heads",)) -> None:
        super().__init__()
        self.attributes = tuple(attributes)

    def check(self, module: nn.Module, tp_size: int) -> None:
        """:class:`PlanError` for a missing or non-integer attribute, :class:`TensorParallelSizeError` for one that
        does not divide by ``tp_size``."""
        for name in self.attributes:
            value = getattr(module, name, None)
            if not isinstance(value, int) or isinstance(value, bool):
                raise PlanError(f"{type(self).__name__}: {type(module).__name__}.{name} = {value!r} must be an "
                                "integer head count.")
            if value % tp_size:
                raise TensorParallelSizeError(f"{type(self).__name__}: {type(module).__name__}.{name} = {value} "
                                              f"must be divisible by the TP size {tp_size}.")

    def parallelize(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        for name in self.attributes:
            setattr(module, name, getattr(module, name) // device_mesh.size())
        return module

    def __repr__(self) -> str:
        return f"{type(self).__name__}({list(self.attributes)})"


class MlaKvAProjParallel(Style):
    """Multi-head latent attention's ``kv_a_proj_with_mqa`` (transformers' ``mla_kv_a_proj``).

    The projection stays replicated. Its output is ``[compressed kv (kv_lora_rank); rotary key
    (rope_dim)]``: the compressed part feeds the column-wise ``kv_b_proj``, whose input gradient DTensor
    already sums, but the rotary part goes straight into this rank's heads, so its gradient is partial. A
    forward hook passes the last ``rope_dim`` output features through
    :func:`~meshplan.tensor_parallel.styles.gradients.all_reduce_backward`. ``rope_dim`` is the model config's
    ``qk_rope_head_dim`` (the Hugging Face fallback fills it in); a DTensor output is left alone (DTensor sums its
    gradients itself)."""

    def __init__(self, rope_dim: int | None = None) -> None:
        super().__init__()
        self.rope_dim = rope_dim

    def check(self, module: nn.Module, tp_size: int) -> None:
        """:class:`PlanError` without a positive rotary width."""
        if self.rope_dim is None or self.rope_dim <= 0:
            raise PlanError(f"{type(self).__name__} needs the rotary width: use MlaKvAProjParallel(rope_dim="
                            "config.qk_rope_head_dim) instead of the bare style name 'mla_kv_a_proj' in the plan.")

    def parallelize(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        rope_dim = self.rope_dim

        def hook(mod: nn.Module, args: tuple, output: Any) -> Any:
            if not isinstance(output, torch.Tensor) or isinstance(output, DTensor):
                return output
            width = output.shape[-1]
            if width <= rope_dim:
                raise PlanError(f"{type(self).__name__}: {type(mod).__name__} returned {width} features, not more "
                                f"than the rotary width {rope_dim}.")
            compressed, rotary = output.split([width - rope_dim, rope_dim], dim=-1)
            return torch.cat([compressed, all_reduce_backward(rotary, device_mesh)], dim=-1)

        module.register_forward_hook(hook)
        return module

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rope_dim={self.rope_dim})"
