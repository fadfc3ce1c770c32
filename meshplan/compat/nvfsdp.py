"""The legacy ``nvfsdp.fully_shard`` call NeMo AutoModel makes, served by meshplan's Megatron-FSDP strategy.

NeMo AutoModel's ``nvfsdp_strategy_parallelize`` calls ``nvfsdp_fully_shard(module=..., optimizer=...,
fsdp_unit_modules=..., device_mesh=..., dp_mesh_name=..., ...)``: the keyword API of ``nvfsdp``, the package
that became ``megatron_fsdp``. :data:`megatron_fsdp_shim` takes exactly that call, maps its keywords onto
:class:`~meshplan.strategies.megatron_fsdp.MegatronFSDPOptions` (see :data:`LEGACY_KEYWORDS`) and runs the
strategy's own :func:`~meshplan.strategies.megatron_fsdp.build_call` and
:func:`~meshplan.strategies.megatron_fsdp.shard`, so every check of the strategy applies.

``dp_cp_mesh_name`` has no option: with context parallelism meshplan shards over the flattened ``<dp>_<cp>``
dim and creates it when the mesh lacks it (the strategy's mesh roles decide the dims).
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.optim import Optimizer

from ..core.errors import StrategyUnavailableError
from ..core.roles import MeshRoles, resolve_roles
from ..strategies.megatron_fsdp import MegatronFSDPAPI, MegatronFSDPCall, MegatronFSDPStrategy, build_call, shard

#: ``nvfsdp.fully_shard`` keyword -> :class:`MegatronFSDPOptions` field, where the names differ.
LEGACY_KEYWORDS: dict[str, str] = {
    "fsdp_unit_modules": "nvfsdp_unit_modules",
    "init_model_with_meta_device": "init_nvfsdp_with_meta_device",
    "sync_grads_each_step": "sync_model_each_microbatch",
}
#: Keywords meshplan derives itself (documented above).
DERIVED_KEYWORDS = frozenset({"dp_cp_mesh_name"})


class MegatronFSDPShim:
    """Callable with the legacy ``nvfsdp.fully_shard`` signature; returns ``(model, optimizer)``."""

    def __init__(self, strategy: MegatronFSDPStrategy | None = None) -> None:
        self.strategy = strategy or MegatronFSDPStrategy()

    def prepare(
        self, module: nn.Module, device_mesh: DeviceMesh, optimizer: Optimizer | None = None, **legacy: Any
    ) -> tuple[MegatronFSDPCall, MegatronFSDPAPI, MeshRoles]:
        """Check availability, the mesh and every option and build the call, before anything is modified or
        any collective runs; raises the strategy's typed errors."""
        reason = self.strategy.unavailable_reason(device_mesh.device_type)
        if reason:
            raise StrategyUnavailableError(f"nvFSDP (Megatron-FSDP) cannot run here: {reason}")
        options = {LEGACY_KEYWORDS.get(k, k): v for k, v in legacy.items() if k not in DERIVED_KEYWORDS}
        typed = self.strategy.make_options({**options, "optimizer": optimizer})
        roles = resolve_roles(device_mesh, typed.mesh_roles(), self.strategy.name)
        api = MegatronFSDPAPI.load()
        return build_call(module, roles, typed, api), api, roles

    def __call__(
        self, module: nn.Module, device_mesh: DeviceMesh, optimizer: Optimizer | None = None, **legacy: Any
    ) -> tuple[nn.Module, Optimizer | None]:
        call, api, roles = self.prepare(module, device_mesh, optimizer, **legacy)
        wrapped, _ = shard(module, roles, call, api)
        return wrapped, optimizer


#: The default ``nvfsdp_fully_shard`` of :mod:`meshplan.parallelizer`.
megatron_fsdp_shim = MegatronFSDPShim()
