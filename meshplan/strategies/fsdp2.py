"""The ``fsdp2`` strategy: tensor/sequence parallel -> activation checkpointing -> FSDP2 (or HSDP).

It supports ``tp``, ``cp``, ``ep`` and ``pp`` (each pipeline stage goes through the order below;
:mod:`meshplan.pipeline`). The composition order is the shared one
(:class:`meshplan.strategies.composition.ComposedStrategy`):

1. **Tensor parallel** on the ``tp`` mesh dim with the plan the dispatcher resolved and validated
   (:func:`meshplan.tensor_parallel.apply.apply_tensor_parallel`, which also keeps tied input/output
   embeddings tied).
   **Context parallel** on the ``cp`` dim, when it is larger than 1: the model's attention is wrapped
   (:func:`meshplan.context_parallel.apply_context_parallel`, option ``cp_implementation``); batches are
   sharded with :func:`meshplan.context_parallel.shard_batch`.
   **Expert parallel** with ``ep_size`` > 1: the EP plan's experts modules keep their own experts and get their
   tokens by all-to-all (:func:`meshplan.experts.apply.apply_expert_parallel`) on ranks carved from
   ``dp_shard`` x ``cp`` (and ``tp`` when the TP plan leaves the experts whole; :mod:`meshplan.core.roles`).
2. **Activation checkpointing** (:mod:`meshplan.activation_checkpointing`) of the model's blocks.
3. **FSDP2** (``torch.distributed.fsdp.fully_shard``) of every block found structurally by
   :func:`meshplan.introspection.blocks.find_blocks`; the last block does not reshard after forward (backward
   needs it first). Fused expert parameters ``[num_experts, ...]`` are sharded on a dim that splits evenly
   when dim 0 does not (more shards than experts; :mod:`meshplan.experts.sharding`). Under EP each experts
   module is its own unit first, on the ranks that hold the same experts (``roles.expert_data_parallel``),
   its gradients averaged over the dense data-parallel size.
4. The **root unit** (embeddings, final norm, ``lm_head``: everything outside the blocks, so a tied
   embedding and ``lm_head`` share one unit), which never reshards after forward.

The mesh roles (:mod:`meshplan.core.roles`): ``tp`` (``tp_mesh_name``), ``cp`` (``cp_mesh_name``),
``dp_shard`` (``dp_shard_cp_mesh_name``, then ``dp_shard_cp``, ``dp_shard``, ``dp``) and ``dp_replicate``
(``dp_replicate_mesh_name``, then ``dp_replicate``). Parameters are sharded over ``dp_shard`` x ``cp``; a
replicate dim larger than 1 makes it HSDP on the 2-D (replicate, shard) mesh. Every other dim larger than 1
is an error, so no rank trains as an unsynchronised copy.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..activation_checkpointing import CheckpointingOptions
from ..core.axis_options import ContextParallelOptions, ExpertParallelOptions
from ..core.errors import MeshError, OptionsError, UnsupportedConfigurationError
from ..core.expert_mesh import dense_data_parallel_size
from ..core.log import get_logger, log_rank0
from ..core.plans import PlanSet
from ..core.roles import MeshRoles, RoleDims, role_dims
from ..core.strategy import StrategyOptions
from ..pipeline.options import PipelineParallelOptions
from ..plugins.hookspecs import hookimpl
from .composition import ComposedStrategy, Composition

if TYPE_CHECKING:  # torch.distributed.fsdp is imported on use, so listing strategies stays fast
    from torch.distributed.fsdp import MixedPrecisionPolicy, OffloadPolicy

logger = get_logger(__name__)

#: Sharding dims tried after ``dp_shard_cp_mesh_name``, in order.
SHARD_DIM_FALLBACKS = ("dp_shard_cp", "dp_shard", "dp")
#: Replication dims tried after ``dp_replicate_mesh_name``, in order.
REPLICATE_DIM_FALLBACKS = ("dp_replicate",)


def default_mp_policy() -> MixedPrecisionPolicy:
    """bf16 parameters in forward/backward, fp32 gradient reduction, fp32 output (applied at the root)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy  # loaded on use: keeps start-up light

    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                output_dtype=torch.float32)


@dataclass
class FSDP2Options(CheckpointingOptions, ContextParallelOptions, ExpertParallelOptions, PipelineParallelOptions):
    """Options of the ``fsdp2`` strategy (plus ``tp_mesh_name``, ``sequence_parallel``, ``strict``; ``cp_mesh_name``
    and ``cp_implementation`` from :class:`~meshplan.core.axis_options.ContextParallelOptions`, ``ep_size`` from
    :class:`~meshplan.core.axis_options.ExpertParallelOptions`, the ``pp_*`` options from
    :class:`~meshplan.pipeline.options.PipelineParallelOptions`, the activation-checkpointing options).

    Attributes:
        dp_replicate_mesh_name: mesh dim to replicate across (HSDP when its size is > 1); ``"dp_replicate"``
            is also tried.
        dp_shard_cp_mesh_name: mesh dim to shard across; ``"dp_shard_cp"``, ``"dp_shard"`` and ``"dp"`` are
            tried after it. A dim of size 1 is fine (TP-only training still needs one). Parameters are sharded
            over shard x cp; with ``cp_implementation="external"`` ``cp`` still shards parameters.
        mp_policy: FSDP2 mixed precision. ``None`` (default) = bf16 parameters, fp32 gradient reduction and
            fp32 output. ``output_dtype`` is applied at the root only: casting every block's output (as NeMo
            AutoModel does) feeds fp32 activations to a bf16 ``lm_head`` and fails on transformers 5.x.
            Pass ``MixedPrecisionPolicy()`` to train in the parameters' own dtype (e.g. fp32).
        offload_policy: FSDP2 offload policy, passed through (``CPUOffloadPolicy()`` needs an accelerator
            mesh; on a CPU mesh it is rejected up front). ``None`` = no offload.
        reshard_after_forward: reshard block parameters after forward (ZeRO-3, default). ``False`` keeps
            them gathered until backward (ZeRO-2-like). The last block and the root never reshard.
        ep_size: with expert parallelism each experts module is FSDP-sharded over the ranks holding the same
            experts (see :class:`~meshplan.core.axis_options.ExpertParallelOptions`).
    """

    dp_replicate_mesh_name: str = "dp_replicate"
    dp_shard_cp_mesh_name: str = "dp_shard_cp"
    mp_policy: MixedPrecisionPolicy | None = None
    offload_policy: OffloadPolicy | None = None
    reshard_after_forward: bool = True

    def mesh_roles(self) -> dict[str, RoleDims]:
        return super().mesh_roles() | {
            "dp_replicate": role_dims("dp_replicate_mesh_name", self.dp_replicate_mesh_name,
                                      *REPLICATE_DIM_FALLBACKS),
            "dp_shard": role_dims("dp_shard_cp_mesh_name", self.dp_shard_cp_mesh_name, *SHARD_DIM_FALLBACKS),
        }

    def report(self) -> dict[str, str]:
        """``mp_policy`` is shown as the policy FSDP2 applies: ``None`` means bf16 compute."""
        shown = super().report()
        if self.mp_policy is None:
            shown["mp_policy"] = f"{default_mp_policy()!r} (default: bf16 compute; MixedPrecisionPolicy() for fp32)"
        return shown


def require_shard_dim(roles: MeshRoles, options: FSDP2Options) -> None:
    """:class:`MeshError` unless the mesh has a data-parallel shard dim (size 1 is fine)."""
    if "dp_shard" in roles.dims:
        return
    looked_for = options.mesh_roles()["dp_shard"].looked_for()
    raise MeshError(
        f"fsdp2 needs a data-parallel shard dim: looked for {looked_for}, but the mesh has "
        f"{list(roles.mesh.mesh_dim_names or ()) or 'no named dimensions'} (shape {tuple(roles.mesh.shape)}). "
        "Add one (size 1 is fine), e.g. init_device_mesh(..., mesh_dim_names=('dp_shard', 'tp')), or pass "
        "dp_shard_cp_mesh_name= to name yours."
    )


def block_and_root_policies(
    mp_policy: MixedPrecisionPolicy | None,
) -> tuple[MixedPrecisionPolicy, MixedPrecisionPolicy]:
    """``(block policy, root policy)``: the root casts the model's output; blocks keep their compute dtype."""
    root = default_mp_policy() if mp_policy is None else mp_policy
    return dataclasses.replace(root, output_dtype=None), root


class FSDP2Strategy(ComposedStrategy):
    """PyTorch FSDP2 (``fully_shard``) over the data-parallel mesh, after the model-parallel axes."""

    name = "fsdp2"
    supports = frozenset({"tp", "cp", "ep", "pp"})
    description = "TP/SP -> CP -> EP -> activation checkpointing -> FSDP2 / HSDP (torch fully_shard)"
    options_class = FSDP2Options

    def validate(self, model: nn.Module, roles: MeshRoles, plans: PlanSet, options: StrategyOptions) -> None:
        """Require FSDP2 options and a shard dim, reject offload on CPU; the shared checks (CP, activation
        checkpointing) run in :meth:`ComposedStrategy.validate` (``prepare`` checked the plans and EP sizes)."""
        from torch.distributed.fsdp import CPUOffloadPolicy  # loaded on use: keeps start-up light

        require_fsdp2_options(options)
        require_shard_dim(roles, options)
        super().validate(model, roles, plans, options)
        if isinstance(options.offload_policy, CPUOffloadPolicy) and roles.mesh.device_type == "cpu":
            raise UnsupportedConfigurationError(
                "offload_policy=CPUOffloadPolicy() needs an accelerator mesh (cuda, ...): on a CPU mesh torch's "
                "FSDP2 fails with 'Cannot access accelerator device'. Parameters already live on the CPU here; "
                "drop offload_policy.")

    def wrap_data_parallel(self, model: nn.Module, roles: MeshRoles, plans: PlanSet, options: StrategyOptions,
                           validated: None, done: Composition) -> nn.Module:
        """FSDP2 units: each experts module (under EP), each block, then the root."""
        from torch.distributed.fsdp import OffloadPolicy, fully_shard

        from ..experts.apply import shard_experts  # DTensor: imported on use
        from ..experts.sharding import shard_placement_fn

        dp = roles.data_parallel
        block_policy, root_policy = block_and_root_policies(options.mp_policy)
        offload = options.offload_policy or OffloadPolicy()
        expert_meshes = roles.expert_meshes() if done.experts else None
        # even expert shards, packed parameters off their packed dim; None: FSDP2's default everywhere
        placement = shard_placement_fn(model, dp.shard_size,
                                       expert_meshes.data_parallel.shard_size if expert_meshes else None)
        if expert_meshes is not None:  # their own units on the expert data-parallel mesh, before their blocks
            shard_experts(done.experts, expert_meshes, dense_data_parallel_size(dp), mp_policy=block_policy,
                          offload_policy=offload, reshard_after_forward=options.reshard_after_forward,
                          shard_placement_fn=placement)
            log_rank0(logger, logging.INFO, "fsdp2: %s; %d experts module(s)", expert_meshes.describe(),
                      len(done.experts))
        for index, (fqn, _) in enumerate(done.blocks):
            last = index == len(done.blocks) - 1
            # Look the block up again: checkpointing may have replaced it with its wrapper.
            fully_shard(model.get_submodule(fqn), mesh=dp.mesh, mp_policy=block_policy, offload_policy=offload,
                        reshard_after_forward=options.reshard_after_forward and not last,
                        shard_placement_fn=placement)
        fully_shard(model, mesh=dp.mesh, mp_policy=root_policy, offload_policy=offload,
                    reshard_after_forward=False, shard_placement_fn=placement)
        plan = plans.tp
        log_rank0(logger, logging.INFO, "fsdp2: %s; TP %s; CP %s; activation checkpointing of %d module(s); "
                  "%d block unit(s) + root", dp.describe(),
                  f"on {options.tp_mesh_name!r} ({len(plan.styles)} plan keys)" if plan else "off",
                  f"{options.cp_implementation} over {roles.size('cp')}" if roles.cp is not None else "off",
                  len(done.checkpointed), len(done.blocks))
        return model


def require_fsdp2_options(options: StrategyOptions) -> None:
    """Raise :class:`OptionsError` unless ``options`` is an :class:`FSDP2Options`."""
    if not isinstance(options, FSDP2Options):
        raise OptionsError(f"The fsdp2 strategy needs FSDP2Options, got {type(options).__name__}.")


@hookimpl
def meshplan_register_strategies(register) -> None:  # noqa: ANN001 - the hook's callback
    register(FSDP2Strategy)
