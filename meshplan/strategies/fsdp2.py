"""The ``fsdp2`` strategy: tensor/sequence parallel -> activation checkpointing -> FSDP2 (HSDP)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard

from ..core.blocks import find_blocks
from ..core.mesh import require_submesh, submesh
from ..core.plan import ResolvedPlan
from ..core.strategy import Strategy, StrategyOptions
from ..core.tensor_parallel import apply_tensor_parallel
from ..plugins.hookspecs import hookimpl


@dataclass
class FSDP2Options(StrategyOptions):
    """Options of the ``fsdp2`` strategy."""

    dp_replicate_mesh_name: str = "dp_replicate"
    dp_shard_cp_mesh_name: str = "dp_shard_cp"


class FSDP2Strategy(Strategy):
    """PyTorch FSDP2 (``fully_shard``) over the data-parallel mesh, after tensor parallelism."""

    name = "fsdp2"
    description = "TP/SP -> activation checkpointing -> FSDP2 / HSDP (torch fully_shard)"
    options_class = FSDP2Options

    def parallelize(
        self, model: nn.Module, device_mesh: DeviceMesh, plan: ResolvedPlan | None, options: StrategyOptions
    ) -> nn.Module:
        if plan is not None:
            tp_mesh = submesh(device_mesh, options.tp_mesh_name)
            apply_tensor_parallel(model, tp_mesh, plan)
        _, dp_mesh = require_submesh(device_mesh, (options.dp_shard_cp_mesh_name, "dp_shard", "dp"),
                                     "data-parallel sharding")
        for _, block in find_blocks(model):
            fully_shard(block, mesh=dp_mesh)
        fully_shard(model, mesh=dp_mesh, reshard_after_forward=False)
        return model


@hookimpl
def meshplan_register_strategies(register) -> None:  # noqa: ANN001
    register(FSDP2Strategy)
