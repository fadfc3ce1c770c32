"""Split a model into pipeline stages, parallelize each stage, and wrap them with torch's schedule.

:func:`plan_pipeline` decides everything without touching the model or running a collective (the schedule, the
microbatches, the layout, every stage's blocks and which rank holds it); :func:`build_pipeline` builds this
rank's stage modules, hands each to a stage-parallelize callback (the normal order: TP -> CP -> EP -> activation
checkpointing -> FSDP2 / HSDP, run by the strategy on the mesh without ``pp``), and returns a
:class:`~meshplan.pipeline.model.PipelineModel`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import PrepareModuleOutput

from ..core.errors import PipelineError, PipelineScheduleError
from ..core.plans import PlanSet, ResolvedPlan
from ..core.roles import MeshRoles
from ..planning.build import build_plan
from ..tensor_parallel.matching import match_key
from ..tensor_parallel.styles.composition import ChainedStyles
from .model import PipelineLoss, PipelineModel, causal_lm_loss, mean_loss, with_router_loss
from .options import PipelineParallelOptions
from .plan import PipelinePlan
from .router_loss import check_router_loss, uses_router_loss
from .schedules import check_schedule, resolve_schedule
from .split import PipelineLayout, check_tied_parameters, find_layout, stage_block_ranges
from .stages import StageInfo, build_stage, is_hf_causal_lm, stage_info


def plan_pipeline(model: nn.Module, pp: int, options: PipelineParallelOptions, provided: Any = None) -> PipelinePlan:
    """Validate the pipeline options against ``model`` and decide the stages; typed errors
    (:class:`~meshplan.PipelineError` subclasses), identical on every rank, before any collective. The split is
    the ``pp_plan`` option, else ``provided`` (a plan provider's ``pp`` entry, ``plans.pp``), else Hugging Face's
    ``base_model_pp_plan``."""
    spec = resolve_schedule(options.pp_schedule)
    microbatches = options.pp_microbatches
    if microbatches is None:
        microbatches = pp * options.pp_stages_per_rank
    check_schedule(spec, pp, microbatches, options.pp_stages_per_rank)
    if options.pp_plan is not None:
        layout = find_layout(model, options.pp_plan, "pp_plan option")
    else:
        layout = find_layout(model, provided, "pp entry of the model's plan provider")
    ranges = stage_block_ranges(model, layout, pp * options.pp_stages_per_rank, options.pp_split)
    check_tied_parameters(model, layout, ranges)
    stage_loss(model, options, microbatches)  # refuses models whose loss cannot be computed per stage
    return PipelinePlan(spec, pp, microbatches, options.pp_stages_per_rank, layout, tuple(ranges))


def stage_loss(model: nn.Module, options: PipelineParallelOptions, microbatches: int) -> PipelineLoss:
    """The last stage's loss: ``pp_loss_fn`` if given, else a Hugging Face causal LM's own loss (with its router
    auxiliary loss when the config asks for it: :mod:`.router_loss`)."""
    if options.pp_loss_fn is not None:
        return mean_loss(options.pp_loss_fn, microbatches)
    if not is_hf_causal_lm(model):
        raise PipelineError(f"{type(model).__qualname__} is not a Hugging Face causal LM: pass pp_loss_fn="
                            "loss_fn(output, target) (the mean loss of a microbatch) for its last stage.")
    if uses_router_loss(model):
        check_router_loss(model)
        return with_router_loss(causal_lm_loss(model), model, microbatches)
    return causal_lm_loss(model)


def _device(mesh: DeviceMesh) -> torch.device:
    if mesh.device_type == "cpu":
        return torch.device("cpu")
    return torch.device(mesh.device_type, torch.get_device_module(mesh.device_type).current_device())


def build_pipeline(model: nn.Module, plan: PipelinePlan, pp_mesh: DeviceMesh, options: PipelineParallelOptions,
                   parallelize_stage: Callable[[nn.Module], nn.Module]) -> PipelineModel:
    """This rank's :class:`PipelineModel`: its stages built from ``model`` (the last one in place, earlier ones as
    copies of only what they keep), each passed through ``parallelize_stage``, then torch's schedule."""
    loss = stage_loss(model, options, plan.microbatches)
    mine = plan.stages_on(pp_mesh.get_local_rank())
    modules = []
    for position, index in enumerate(mine):
        info = StageInfo(index, plan.num_stages, plan.ranges[index])
        modules.append(parallelize_stage(build_stage(model, plan.layout, info, in_place=position == len(mine) - 1)))
    pipe = PipelineModel(modules, pp_mesh, plan, loss)
    device, group = _device(pp_mesh), pp_mesh.get_group()
    stages = [PipelineStage(module, index, plan.num_stages, device, group=group)
              for module, index in zip(modules, mine)]
    try:
        schedule = plan.schedule.cls(stages if plan.schedule.multi_stage else stages[0], plan.microbatches,
                                     loss_fn=pipe.compute_loss, scale_grads=False)
    except ValueError as exc:  # a rule check_schedule does not know yet (a newer torch)
        raise PipelineScheduleError(f"torch's {plan.schedule.name} refused this layout: {exc}") from exc
    pipe.schedule = schedule
    return pipe


def stage_styles(stage: nn.Module, styles: Mapping[str, Any], layout: PipelineLayout,
                 sequence_parallel: bool) -> dict[str, Any]:
    """The plan entries (TP or EP) of one stage, with fresh style objects: the entries that match something the
    stage holds (not the identities standing in for the embeddings on later stages or the head on earlier ones);
    entries for the
    first block (``layers.0``, where sequence parallel shards the residual stream) moved to the stage's first
    block; under sequence parallel, the last block of a non-last stage gathers the sequence again, so stages
    exchange ordinary full tensors."""
    info = stage_info(stage)
    zero, first = layout.block_fqn(0), layout.block_fqn(info.blocks.start)
    kept = {}
    for key, style in styles.items():
        if key == zero or key.startswith(zero + "."):
            key = first + key[len(zero):]
        if any(not isinstance(stage.get_submodule(fqn), nn.Identity) for fqn in match_key(stage, key)):
            kept[key] = copy.deepcopy(style)
    if sequence_parallel and not info.is_last:
        last = layout.block_fqn(info.blocks.stop - 1)
        gather = PrepareModuleOutput(output_layouts=Shard(1), desired_output_layouts=Replicate(),
                                     use_local_output=True)
        kept[last] = ChainedStyles(kept[last], gather) if last in kept else gather
    return kept


def stage_plans(stage: nn.Module, plans: PlanSet, layout: PipelineLayout, strict: bool) -> PlanSet:
    """The plans of one stage: the whole model's TP and EP plans cut to what the stage holds
    (:func:`stage_tp_plan`), matched and fitted again to the stage's modules."""
    fitted = {}
    for axis in ("tp", "ep"):
        whole = getattr(plans, axis)
        if whole is not None:
            sequence_parallel = whole.sequence_parallel and axis == "tp"
            styles = stage_styles(stage, whole.styles, layout, sequence_parallel)
            resolved = ResolvedPlan(styles, f"{whole.source}, cut to stage {stage_info(stage).index}",
                                    whole.sequence_parallel)
            fitted[axis] = build_plan(stage, resolved, axis, whole.size, strict)
    return PlanSet(fitted.get("tp"), fitted.get("ep"), plans.pp)


def parallelize_stages(model: nn.Module, roles: MeshRoles, plans: PlanSet, options: PipelineParallelOptions,
                       compose: Callable[[nn.Module, PlanSet], nn.Module]) -> PipelineModel:
    """The pipeline step of the shared composition order: split ``model`` into this rank's stages (``roles.pp``),
    run ``compose`` (the other steps: TP, CP, EP, activation checkpointing, data-parallel wrapping) on each with
    its :func:`stage_plans`, and return the :class:`PipelineModel`."""
    plan = plan_pipeline(model, roles.size("pp"), options, plans.pp)
    strict = getattr(options, "strict", True)
    return build_pipeline(model, plan, roles.pp, options,
                          lambda stage: compose(stage, stage_plans(stage, plans, plan.layout, strict)))


__all__: Sequence[str] = ("PipelinePlan", "build_pipeline", "parallelize_stages", "plan_pipeline", "stage_plans",
                          "stage_styles")
