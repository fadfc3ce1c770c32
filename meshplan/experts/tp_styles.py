"""Tensor-parallel styles for fused expert modules (transformers' ``moe_tp_experts`` and ``moe_identity_expert``).

:class:`ExpertsTensorParallel` splits *every* expert of a fused experts module along its intermediate size, as
transformers 5.24 does with ``packed_colwise`` on ``experts.gate_up_proj``, ``rowwise`` on ``experts.down_proj``
and ``moe_tp_experts`` on the module:

* ``gate_up_proj [E, 2*I, H]`` -> ``Shard(1)``, packed: each rank keeps ``[gate_r; up_r]`` of every expert (stored
  rank-major like :class:`~meshplan.tensor_parallel.styles.packed.PackedColwiseParallel`, so a gathered tensor
  goes through :func:`~meshplan.state.packing.unpack_full_state_dict`);
* ``down_proj [E, H, I]`` -> ``Shard(2)``; a ``down_proj_bias`` stays replicated and each rank adds ``1 / tp``;
* the module's own forward (any experts implementation: eager loop, ``grouped_mm``, ``batched_mm``) runs on the
  local shards with the full routing, so its output is this rank's partial sum, all-reduced once over TP;
* in backward the gradients of ``hidden_states`` and of the routing weights, partial on each rank, are summed.

The router, shared experts and the rest of the layer are planned separately.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial

from ..tensor_parallel.styles.gradients import all_reduce_forward, replicated_local_input
from ..tensor_parallel.styles.local_parameters import LocalParameterForward
from ..tensor_parallel.styles.protocol import ParamSplit, Placements, Style
from .modules import SUMMAND, ExpertParamLayout, check_param_layouts, infer_param_layouts

#: Keyword names transformers' MoE blocks use for the routing weights when they are not passed positionally
#: (``gammas``: the per-token weights of Inkling's shared experts).
ROUTING_WEIGHT_KEYWORDS = ("top_k_weights", "topk_weights", "routing_weights", "router_scores", "gammas")


class ExpertsTensorParallel(LocalParameterForward):
    """Every expert of a fused experts module split along its intermediate size (``moe_tp_experts``).

    ``params`` maps parameter names to their :class:`ExpertParamLayout`; the module's other parameters are read
    off the module (:func:`~meshplan.experts.modules.infer_param_layouts`). The Hugging Face fallback passes the
    layouts its plan's ``packed_colwise`` / ``colwise`` / ``rowwise`` parameter entries declare.
    """

    def __init__(self, params: Mapping[str, ExpertParamLayout] | None = None) -> None:
        super().__init__()
        self.params = dict(params) if params is not None else None

    shards_parameters = True

    def layouts(self, module: nn.Module) -> dict[str, ExpertParamLayout]:
        """The layouts this style gives ``module``'s parameters (``params``, the others inferred)."""
        return infer_param_layouts(module, self.params)

    def placements(self, module: nn.Module) -> Placements | None:
        """Each laid-out parameter's split: packed along its (non-negative) dim, or replicated and added once."""
        placements: dict[str, ParamSplit] = {}
        for name, layout in self.layouts(module).items():
            if layout.dim is None:
                placements[name] = ParamSplit(None, summand=True)
                continue
            param = module.get_parameter(name)
            dim = layout.dim % param.ndim
            parts = (param.shape[dim] // layout.parts,) * layout.parts if layout.parts > 1 else ()
            placements[name] = ParamSplit(dim, parts)
        return placements

    def check(self, module: nn.Module, tp_size: int) -> None:
        """Typed errors for a module this style cannot split in ``tp_size`` (no collective; same on every rank)."""
        check_param_layouts(module, self.layouts(module), tp_size)

    def _local(self, param: DTensor) -> torch.Tensor:
        if param.placements[0].is_replicate():  # a summand: each rank adds 1/tp, gradients summed
            return param.to_local(grad_placements=[Partial()]) / param.device_mesh.size()
        return param.to_local()

    def parallelize(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        self.distribute_parameters(module, device_mesh)
        module.register_forward_pre_hook(self._inputs(device_mesh), with_kwargs=True)
        module.register_forward_hook(lambda mod, args, out: all_reduce_forward(out, device_mesh)
                                     if isinstance(out, torch.Tensor) else out)
        return self._run_on_local_parameters(module)

    @staticmethod
    def _inputs(mesh: DeviceMesh) -> Any:
        def prepare(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            args = tuple(replicated_local_input(a, mesh) if i in (0, 2) else a for i, a in enumerate(args))
            kwargs = {k: replicated_local_input(v, mesh) if k == "hidden_states" or k in ROUTING_WEIGHT_KEYWORDS else v
                      for k, v in kwargs.items()}
            return args, kwargs

        return prepare

    def __repr__(self) -> str:
        shown = "inferred" if self.params is None else {n: (p.dim, p.parts) for n, p in self.params.items()}
        return f"{type(self).__name__}(params={shown})"


class IdentityExpertParallel(Style):
    """An identity ("zero") expert inside a TP-split experts module (``moe_identity_expert``, LongCat-Flash):
    its input is divided by the TP size, so the all-reduce of the experts' output adds it exactly once; the
    gradient flows back through the experts' ``hidden_states``, which :class:`ExpertsTensorParallel` sums."""

    def parallelize(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        world = device_mesh.size()

        def scale(mod: nn.Module, args: tuple) -> tuple:
            return (args[0] / world, *args[1:]) if args and isinstance(args[0], torch.Tensor) else args

        module.register_forward_pre_hook(scale)
        return module

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


__all__ = ["SUMMAND", "ExpertParamLayout", "ExpertsTensorParallel", "IdentityExpertParallel"]
