"""The ``ddp`` strategy: tensor parallel -> activation checkpointing -> data-parallel replication.

Every data-parallel rank keeps a full replica (of its TP shard) and gradients are all-reduced over the
``dp`` mesh dim. The model is modified in place and returned (no wrapper object), so attributes such as
``model.config`` stay reachable.

Two torch mechanisms, chosen by whether TP is applied:

* no TP (no ``tp`` dim, or size 1): ``DistributedDataParallel`` through torch's composable
  ``replicate`` (``torch.distributed._composable.replicate``), which takes DDP's ``bucket_cap_mb``,
  ``find_unused_parameters`` and ``static_graph``.
* TP: DDP cannot keep DTensor parameters in torch 2.13. Given a sliced DP mesh it swaps them for local
  tensors, so after the first forward the TP-sharded weights are no longer registered parameters
  (``named_parameters()`` and ``state_dict()`` lose them); the composable ``replicate`` on the same
  model diverged from one process from step 2 on. The FSDP2-based ``replicate``
  (``torch.distributed._composable.replicate_with_fsdp``) keeps the DTensor parameters and matched one
  process to 2e-6 (dp=2 x tp=2, AdamW lr 1e-4). It all-reduces per replicated module (each block,
  then the root) instead of in size buckets, and handles unused parameters without being told, so
  ``bucket_cap_mb`` and ``static_graph`` are rejected with TP and ``find_unused_parameters`` is not needed.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from ..activation_checkpointing import CheckpointingOptions
from ..core.errors import MeshError, StrategyUnavailableError, UnsupportedConfigurationError
from ..core.log import get_logger, log_rank0
from ..core.mesh import dim_names
from ..core.plans import PlanSet
from ..core.roles import MeshRoles, RoleDims, role_dims
from ..core.strategy import StrategyOptions
from ..core.torch_private import DDP_REPLICATE_MODULE, TP_REPLICATE_MODULE
from ..plugins.hookspecs import hookimpl
from .composition import ComposedStrategy, Composition

DDP_REPLICATE = DDP_REPLICATE_MODULE
TP_REPLICATE = TP_REPLICATE_MODULE

logger = get_logger(__name__)


@dataclass
class DDPOptions(CheckpointingOptions):
    """Options of the ``ddp`` strategy.

    Attributes:
        dp_mesh_name: the data-parallel mesh dim (a real or flattened dim); without it, ``dp_replicate`` and
            ``dp_shard`` are flattened into one. Together with the TP dim it must cover every rank of the
            mesh. A 1-D mesh without dim names is used whole.
        bucket_cap_mb: DDP gradient bucket size in MiB (``None``: torch's default, 25). Not with TP.
        find_unused_parameters: let DDP handle parameters that get no gradient in a step. With TP the
            replication tolerates them anyway.
        static_graph: tell DDP the set of used parameters never changes (enables its optimizations). Not with TP.
        activation_checkpointing / activation_checkpointing_every: see
            :class:`meshplan.activation_checkpointing.CheckpointingOptions`.
    """

    dp_mesh_name: str = "dp"
    bucket_cap_mb: float | None = None
    find_unused_parameters: bool = False
    static_graph: bool = False

    def mesh_roles(self) -> dict[str, RoleDims]:
        # a mesh with separate dp_replicate / dp_shard dims is replicated over both (flattened into one)
        return {
            "tp": super().mesh_roles()["tp"],
            "dp_replicate": role_dims("dp_mesh_name", self.dp_mesh_name, ("dp_replicate", "dp_shard")),
        }


def data_parallel_mesh(roles: MeshRoles, options: DDPOptions) -> DeviceMesh:
    """The 1-D data-parallel sub-mesh; :class:`MeshError` if the mesh has none."""
    mesh = roles.submesh("dp_replicate")
    if mesh is None:
        raise MeshError(
            f"ddp replicates over a data-parallel dim: looked for {options.mesh_roles()['dp_replicate'].looked_for()}"
            f", but the mesh has {list(dim_names(roles.mesh)) or 'no named dimensions'}. Name it 'dp' or pass "
            "dp_mesh_name=...."
        )
    return mesh


def ddp_kwargs(options: DDPOptions) -> dict[str, Any]:
    """The ``DistributedDataParallel`` keyword arguments the options ask for (torch defaults left out)."""
    kwargs: dict[str, Any] = {"find_unused_parameters": options.find_unused_parameters,
                              "static_graph": options.static_graph}
    if options.bucket_cap_mb is not None:
        kwargs["bucket_cap_mb"] = options.bucket_cap_mb
    return kwargs


def _import_replicate(module_name: str) -> Any:
    try:
        return importlib.import_module(module_name).replicate
    except (ImportError, AttributeError) as exc:
        raise StrategyUnavailableError(
            f"ddp needs {module_name}.replicate, which this torch {torch.__version__} lacks ({exc})."
        ) from exc


def _mesh_device(device_mesh: DeviceMesh) -> torch.device:
    """The local device of ``device_mesh`` (``cuda:<current>`` for a CUDA mesh)."""
    if device_mesh.device_type == "cpu":
        return torch.device("cpu")
    index = torch.get_device_module(device_mesh.device_type).current_device()
    return torch.device(device_mesh.device_type, index)


def _to_device(model: nn.Module, device: torch.device) -> None:
    """``model.to(device)``; a model with meta tensors keeps them and records ``device``, where
    ``materialize_meta_model`` / ``load_pretrained`` allocate them (``Module.to`` cannot copy a meta tensor)."""
    from ..state.meta_init import DEVICE_ATTRIBUTE  # imported on use: meta_init imports torch's DCP state dicts

    tensors = [*model.parameters(), *model.buffers()]
    if not any(tensor.is_meta for tensor in tensors):
        model.to(device)
        return
    misplaced = sorted({str(t.device) for t in tensors if not t.is_meta and t.device != device})
    if misplaced:
        raise UnsupportedConfigurationError(
            f"ddp: the model has tensors on the meta device and others on {misplaced}, not on {device}; build it "
            "entirely under `with torch.device('meta'):` (then materialize_meta_model / load_pretrained) or "
            "entirely materialized.")
    setattr(model, DEVICE_ATTRIBUTE, device)


class DDPStrategy(ComposedStrategy):
    """Data-parallel replication over ``dp`` after tensor parallelism over ``tp`` (see the module docstring)."""

    name = "ddp"
    supports = frozenset({"tp"})
    description = ("TP -> activation checkpointing -> data-parallel replication (DistributedDataParallel; "
                   "FSDP2-based replicate when TP is applied)")
    options_class = DDPOptions

    def validate(self, model: nn.Module, roles: MeshRoles, plans: PlanSet, options: StrategyOptions) -> Any:
        """The data-parallel mesh and DDP's options; returns the ``replicate`` function the wrapping calls."""
        super().validate(model, roles, plans, options)
        if "dp_replicate" not in roles.dims:
            data_parallel_mesh(roles, options)  # raises the MeshError
        cap = options.bucket_cap_mb
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, (int, float)) or cap <= 0):
            raise UnsupportedConfigurationError(f"bucket_cap_mb must be a positive number (MiB) or None, got {cap!r}.")
        if plans.tp is None:
            return _import_replicate(DDP_REPLICATE)
        rejected = [f"{name}={getattr(options, name)!r}" for name, unset in (("bucket_cap_mb", None),
                                                                           ("static_graph", False))
                    if getattr(options, name) != unset]
        if rejected:
            raise UnsupportedConfigurationError(
                f"{', '.join(rejected)} cannot apply with tensor parallelism: DistributedDataParallel cannot keep "
                "DTensor parameters, so on a TP mesh ddp replicates with torch's FSDP2-based replicate, which "
                "all-reduces per block instead of in size buckets and needs no static-graph hint. Drop the "
                "option(s), or use a mesh without TP."
            )
        return _import_replicate(TP_REPLICATE)

    def wrap_data_parallel(self, model: nn.Module, roles: MeshRoles, plans: PlanSet, options: StrategyOptions,
                           validated: Any, done: Composition) -> nn.Module:
        """``validated`` is the ``replicate`` function :meth:`validate` chose."""
        dp_mesh = data_parallel_mesh(roles, options)
        replicate = validated
        if plans.tp is None:
            _to_device(model, _mesh_device(roles.mesh))
            replicate(model, process_group=dp_mesh.get_group(), **ddp_kwargs(options))
            how = f"DistributedDataParallel {ddp_kwargs(options)}"
        else:
            for fqn, _ in done.blocks:  # looked up again: checkpointing may have replaced a block with its wrapper
                replicate(model.get_submodule(fqn), mesh=dp_mesh)
            replicate(model, mesh=dp_mesh)
            how = f"FSDP2-based replicate of {len(done.blocks)} block(s) + root, TP on {options.tp_mesh_name!r}"
            if options.find_unused_parameters:
                how += " (find_unused_parameters not needed: unused parameters are handled without it)"
        log_rank0(logger, logging.INFO, "ddp: dp=%d, %s; activation checkpointing of %d module(s)",
                  dp_mesh.size(), how, len(done.checkpointed))
        return model


@hookimpl
def meshplan_register_strategies(register) -> None:  # noqa: ANN001
    register(DDPStrategy)
