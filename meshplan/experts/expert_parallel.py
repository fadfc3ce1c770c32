"""The expert-parallel style: a fused experts module keeps only its own experts and gets its tokens by all-to-all.

:class:`ExpertParallel` (``ep_dispatch_experts`` in transformers' plans) is a torch ``ParallelStyle`` applied
with the EP mesh. It

* splits the module's expert parameters (``[num_experts, ...]``; by default every parameter whose dim 0 is
  the expert count, or the names the plan's ``grouped_gemm`` entries list) by expert: ``Shard(0)``
  DTensors over the EP mesh, so rank ``r`` holds experts ``[r * local, (r + 1) * local)``. Parameters a TP
  style already split along the expert intermediate size become 2-D DTensors on ``(ep, tp)``; the TP style's
  own forward (local shards, output all-reduced over TP) then runs inside the dispatch, on the received rows;
* wraps the module's forward, whose signature is transformers' experts call
  ``(hidden_states [tokens, hidden], top_k_index [tokens, k], top_k_weights [tokens, k])``: tokens are
  dispatched to the experts' owners (:mod:`meshplan.experts.token_dispatch`), the module's *own* forward runs on
  the rows it received with local expert ids, unit weights and its local parameter shards (so any experts
  implementation works unchanged), and the results are combined back with the routing weights.

A rank that receives no rows still joins both exchanges and gives its parameters a zero gradient, so the
backward collectives (the reverse all-to-all, FSDP's reduce-scatter) run on every rank.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from ..core.errors import ExpertParallelError
from ..core.torch_private import concatenate
from ..introspection.experts import expert_count as fused_expert_count
from ..tensor_parallel.styles.protocol import ParamSplit, Placements, Style
from .token_dispatch import combine, dispatch, gather_tokens, split_tokens

#: Attribute that marks a module the style was applied to: ``(global experts, EP size)``.
EP_ATTRIBUTE = "_meshplan_expert_parallel"


def split_count(module: nn.Module, params: Sequence[str] | None = None) -> int | None:
    """How many experts the style splits: a fused experts module's count
    (:func:`~meshplan.introspection.experts.expert_count`), else its integer ``num_experts``, else the common dim 0
    of ``params``."""
    declared = getattr(module, EP_ATTRIBUTE, None)
    if declared is not None:
        return declared[0]
    count = fused_expert_count(module) or getattr(module, "num_experts", None)
    if isinstance(count, int) and not isinstance(count, bool):
        return count
    own = dict(module.named_parameters(recurse=False))
    leading = {own[name].shape[0] for name in params or () if name in own and own[name].ndim}
    return leading.pop() if len(leading) == 1 else None


def expert_parameters(module: nn.Module, params: Sequence[str] | None = None) -> list[str]:
    """Names of the module's own parameters split by expert: ``params`` if given, else those ``[num_experts, ...]``."""
    if params:
        return list(params)
    count = split_count(module)
    return [name for name, p in module.named_parameters(recurse=False) if p.ndim >= 1 and p.shape[0] == count]


class ExpertParallel(Style):
    """Experts split by expert over the EP mesh, tokens exchanged by all-to-all (see the module docstring).

    Args:
        params: the module's parameters to split (default: every own parameter whose dim 0 is the expert count).
        token_mesh: ranks *inside* the EP group that hold the same tokens (TP ranks the EP group borrowed);
            each dispatches a disjoint slice of them. Set by the strategy, not by plans.
    """

    def __init__(self, params: Sequence[str] | None = None, token_mesh: DeviceMesh | None = None) -> None:
        super().__init__()
        self.params = tuple(params) if params else None
        self.token_mesh = token_mesh

    def check(self, module: nn.Module, ep_size: int) -> None:
        """:class:`ExpertParallelError` unless ``module`` has expert parameters whose expert count divides by
        ``ep_size`` (collective-free, the same on every rank)."""
        count = split_count(module, self.params)
        names = expert_parameters(module, self.params) if count is not None else []
        own = dict(module.named_parameters(recurse=False))
        if count is None or not names:
            raise ExpertParallelError(
                f"ExpertParallel: {type(module).__name__} has no expert parameters (no `num_experts` attribute "
                f"and no parameter [num_experts, ...] among {sorted(own) or 'none'}); name them: "
                "ExpertParallel(params=('gate_up_proj', 'down_proj')).")
        for name in names:
            param = own.get(name)
            if param is None or param.ndim == 0 or param.shape[0] != count:
                raise ExpertParallelError(
                    f"ExpertParallel: {type(module).__name__}.{name} is not an expert parameter [{count}, ...] "
                    f"(shape {None if param is None else tuple(param.shape)}).")
        if count % ep_size:
            divisors = [d for d in range(1, count + 1) if count % d == 0]
            raise ExpertParallelError(f"ep_size={ep_size} does not divide the {count} experts of "
                                      f"{type(module).__name__}; ep_size must be one of {divisors}.")

    shards_parameters = True

    def placements(self, module: nn.Module) -> Placements | None:
        """Each expert parameter split along its expert dim (over the EP mesh)."""
        return {name: ParamSplit(0) for name in expert_parameters(module, self.params)}

    def parallelize(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        ep_size = device_mesh.size()
        count = split_count(module, self.params)
        names = expert_parameters(module, self.params)
        own = dict(module.named_parameters(recurse=False))
        tp_meshes = {name: own[name].device_mesh for name in names if isinstance(own[name], DTensor)}
        for name in names:
            param = own[name]
            sharded = _split_by_expert(param.detach(), device_mesh, count // ep_size)
            module.register_parameter(name, nn.Parameter(sharded, requires_grad=param.requires_grad))
        setattr(module, EP_ATTRIBUTE, (count, ep_size))
        module.forward = _dispatching_forward(module, module.forward, names, count // ep_size, device_mesh,
                                              self.token_mesh, tp_meshes)
        return module

    def __repr__(self) -> str:
        return f"{type(self).__name__}(params={self.params})"


def _split_by_expert(param: torch.Tensor, ep_mesh: DeviceMesh, num_local: int) -> DTensor:
    """``Shard(0)`` over ``ep_mesh``. A parameter a TP style already made a DTensor on the TP mesh (experts split
    along their intermediate size) becomes a 2-D DTensor on ``(ep, tp)``: this rank's experts of its TP shard."""
    if not isinstance(param, DTensor):
        return distribute_tensor(param, ep_mesh, [Shard(0)], src_data_rank=None)
    if param.device_mesh.ndim != 1 or any(isinstance(p, Shard) and p.dim == 0 for p in param.placements):
        raise ExpertParallelError(
            f"ExpertParallel: an expert parameter is already a DTensor with placements {param.placements} on a "
            f"{param.device_mesh.ndim}-D mesh; only a 1-D TP layout that keeps the expert dim whole can be split "
            "by expert as well.")
    start = ep_mesh.get_local_rank() * num_local
    local = param.to_local().narrow(0, start, num_local)
    local = local if local.device.type == "meta" else local.clone()
    mesh = concatenate([ep_mesh, param.device_mesh])
    return DTensor.from_local(local, mesh, [Shard(0), *param.placements], run_check=False, shape=param.shape,
                              stride=param.stride())


def local_shard(param: torch.Tensor, tp_mesh: DeviceMesh | None = None) -> torch.Tensor:
    """This rank's experts of ``param`` (gradients reach the parameter). A 2-D ``(ep, tp)`` parameter stays a
    DTensor on ``tp_mesh``, so the TP style's own forward still sees its TP layout (and handles summands)."""
    if not isinstance(param, DTensor):
        return param
    if tp_mesh is None or param.device_mesh.ndim == 1:
        return param.to_local()
    return DTensor.from_local(param.to_local(), tp_mesh, param.placements[1:], run_check=False)


@contextlib.contextmanager
def local_experts(module: nn.Module, names: Sequence[str], num_local: int,
                  tp_meshes: dict[str, DeviceMesh] | None = None) -> Iterator[list[torch.Tensor]]:
    """Inside, the module's expert parameters are its local shards (:func:`local_shard`) and ``num_experts`` is
    the local count."""
    originals = {name: module._parameters[name] for name in names}
    had_count = "num_experts" in vars(module)
    count = vars(module).get("num_experts")
    local = [local_shard(p, (tp_meshes or {}).get(n)) for n, p in originals.items()]
    try:
        module._parameters.update(zip(names, local))
        if had_count:
            module.num_experts = num_local
        yield local
    finally:
        module._parameters.update(originals)
        if had_count:
            module.num_experts = count


def _dispatching_forward(module: nn.Module, forward: Any, names: Sequence[str], num_local: int,
                         ep_mesh: DeviceMesh, token_mesh: DeviceMesh | None,
                         tp_meshes: dict[str, DeviceMesh]) -> Any:
    group = ep_mesh.get_group()
    split = token_mesh is not None and token_mesh.size() > 1

    @functools.wraps(forward)
    def ep_forward(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                   *args: Any, **kwargs: Any) -> torch.Tensor:
        num_tokens = hidden_states.size(0)
        if split:
            hidden_states, top_k_index, top_k_weights = split_tokens(
                (hidden_states, top_k_index, top_k_weights), token_mesh)
        state = dispatch(hidden_states, top_k_index, top_k_weights, num_local, group)
        with local_experts(module, names, num_local, tp_meshes) as local:
            if state.tokens.size(0):
                ids = state.local_expert_ids.unsqueeze(-1)
                ones = torch.ones(ids.shape, dtype=top_k_weights.dtype, device=ids.device)
                output = forward(state.tokens, ids, ones, *args, **kwargs)
            else:  # nothing to compute: keep the inputs and parameters in the graph (zero gradients)
                anchor = sum((p.to_local() if isinstance(p, DTensor) else p).sum() for p in local
                             if p.requires_grad) * 0
                output = state.tokens * 0 + anchor
        output = combine(output, state, group)
        return gather_tokens(output, num_tokens, token_mesh) if split else output

    return ep_forward
