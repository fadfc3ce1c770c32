"""Modules whose forward computes on local tensors of their DTensor parameters: gradients reach the DTensors
through each parameter's conversion to a local tensor."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, distribute_tensor

from ...core.errors import PlanError, TensorParallelSizeError
from .protocol import REPLICATED, ParamSplit, Placements, Style

#: ``(owner module, parameter name, DTensor -> local tensor)`` for each parameter a forward reads locally
LocalizedParameters = list[tuple[nn.Module, str, Callable[[DTensor], torch.Tensor]]]


def run_on_local_parameters(module: nn.Module, localized: Callable[[], LocalizedParameters]) -> nn.Module:
    """Wrap ``module.forward`` so that it (and its children) read local tensors of the DTensor parameters that
    ``localized()`` names, each made by its converter (through which gradients reach the DTensor); the DTensors
    are put back afterwards. ``localized`` is called on every forward: FSDP may replace parameters between calls."""
    forward = module.forward

    @functools.wraps(forward)
    def local_forward(*args: Any, **kwargs: Any) -> Any:
        originals = [(owner, name, owner._parameters[name], to_local) for owner, name, to_local in localized()]
        for owner, name, param, to_local in originals:
            owner._parameters[name] = to_local(param)
        try:
            return forward(*args, **kwargs)
        finally:
            for owner, name, param, _ in originals:
                owner._parameters[name] = param

    module.forward = local_forward
    return module


def replicate_parameters(module: nn.Module, mesh: DeviceMesh) -> None:
    """Make the module's own plain parameters replicated DTensors on ``mesh`` (those already DTensors stay)."""
    for name, param in list(module.named_parameters(recurse=False)):
        if not isinstance(param, DTensor):
            replicated = distribute_tensor(param.detach(), mesh, [Replicate()])
            module.register_parameter(name, nn.Parameter(replicated, requires_grad=param.requires_grad))


class LocalParameterForward(Style):
    """Shared part of the styles whose module runs its forward on local tensors of its DTensor parameters
    (by default its own parameters only, not its children's); gradients reach the DTensor parameters through
    :meth:`_local`."""

    def _local(self, param: DTensor) -> torch.Tensor:
        raise NotImplementedError

    def _localized(self, module: nn.Module) -> list[tuple[nn.Module, str]]:
        """``(owner, name)`` of the DTensor parameters the module's forward sees as local tensors."""
        return [(module, name) for name, param in module._parameters.items() if isinstance(param, DTensor)]

    def _run_on_local_parameters(self, module: nn.Module) -> nn.Module:
        return run_on_local_parameters(module, lambda: [(owner, name, self._local)
                                                        for owner, name in self._localized(module)])


class ReplicatedWithGradAllReduce(LocalParameterForward):
    """Parameters become replicated DTensors; the module computes on local views whose gradients are
    declared partial, so each rank's contribution is summed across the mesh (transformers'
    ``replicated_with_grad_allreduce``). Works for any input layout, e.g. Qwen3 / Gemma3 ``q_norm``."""

    def placements(self, module: nn.Module) -> Placements | None:
        return {name: REPLICATED for name, _ in module.named_parameters(recurse=False)}

    def _local(self, param: DTensor) -> torch.Tensor:
        return param.to_local(grad_placements=[Partial()])

    def parallelize(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        replicate_parameters(module, device_mesh)
        return self._run_on_local_parameters(module)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class LocalShardedParameters(LocalParameterForward):
    """The named parameters of the module (``{name: dim}``) are sharded along ``dim`` (``Shard(dim)``
    DTensors) and the module's forward sees this rank's shard as a plain tensor, whose gradient is this
    rank's shard of the full gradient.

    For per-head parameters of an attention module whose q/k/v projections are column-wise (each rank computes
    its own heads): attention sinks, per-head gate biases. transformers spells it ``local_params`` on the
    module plus ``colwise`` on each parameter. A name may be dotted (``conv1d.weight``): a child's parameter that
    the module's own forward reads (a short convolution calling ``F.conv1d`` with its child's weight). Every sharded
    dim must divide by the TP size, so that the shards line up with the heads (:meth:`check`, before any
    collective)."""

    shards_parameters = True

    def __init__(self, params: Mapping[str, int]) -> None:
        super().__init__()
        if not params:
            raise PlanError(f"{type(self).__name__} needs at least one parameter name to shard.")
        self.params = dict(params)

    def placements(self, module: nn.Module) -> Placements | None:
        return {name: ParamSplit(dim) for name, dim in self.params.items()}

    def _local(self, param: DTensor) -> torch.Tensor:
        return param.to_local()

    def _owner(self, module: nn.Module, name: str) -> tuple[nn.Module, str]:
        """The module holding parameter ``name`` (dotted: a descendant of ``module``) and its own name for it."""
        path, _, own = name.rpartition(".")
        try:
            owner = module.get_submodule(path)
        except AttributeError as exc:
            raise PlanError(f"{type(self).__name__}: {type(module).__name__} has no submodule {path!r} holding "
                            f"parameter {name!r}.") from exc
        if own not in owner._parameters or owner._parameters[own] is None:
            found = sorted(n for n, _ in module.named_parameters()) or "none"
            raise PlanError(f"{type(self).__name__}: {type(module).__name__} has no parameter {name!r} (it has "
                            f"{found}).")
        return owner, own

    def _localized(self, module: nn.Module) -> list[tuple[nn.Module, str]]:
        owners = (self._owner(module, name) for name in self.params)
        return [(owner, own) for owner, own in owners if isinstance(owner._parameters[own], DTensor)]

    def check(self, module: nn.Module, tp_size: int) -> None:
        """:class:`PlanError` for a missing parameter, :class:`TensorParallelSizeError` for one whose dim does not
        divide by ``tp_size``."""
        for name, dim in self.params.items():
            owner, own = self._owner(module, name)
            param = owner._parameters[own]
            if isinstance(param, DTensor):
                continue
            if param.ndim == 0 or param.shape[dim] % tp_size:
                raise TensorParallelSizeError(
                    f"{type(self).__name__}: parameter {name!r} of {type(module).__name__} with shape "
                    f"{tuple(param.shape)} cannot be split in {tp_size} equal parts along dim {dim}; per-head "
                    "parameters must divide by the TP size like the heads.")

    def parallelize(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        self.distribute_parameters(module, device_mesh)
        return self._run_on_local_parameters(module)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.params})"
