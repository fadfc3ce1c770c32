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
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from ..core.dispatch import REPORT_ATTRIBUTE
from ..core.errors import PipelineError, PipelineScheduleError
from ..core.registry import Registry
from .model import PipelineLoss, PipelineModel, causal_lm_loss, mean_loss
from .options import PipelineParallelOptions
from .schedules import ScheduleSpec, bubble_fraction, check_schedule, resolve_schedule, stage_indices, stage_owner
from .split import PipelineLayout, check_tied_parameters, find_layout, stage_block_ranges, stage_module_names
from .stages import StageInfo, build_stage, is_hf_causal_lm


@dataclass(frozen=True)
class PipelinePlan:
    """Everything pipeline parallelism decided for a model on ``pp`` ranks (no collective ran)."""

    schedule: ScheduleSpec
    pp: int
    microbatches: int
    stages_per_rank: int
    layout: PipelineLayout
    ranges: tuple[range, ...]

    @property
    def num_stages(self) -> int:
        return len(self.ranges)

    def stages_on(self, rank: int) -> list[int]:
        """The stages pp rank ``rank`` holds."""
        return stage_indices(self.schedule, self.pp, self.stages_per_rank, rank)

    def owner(self, stage: int) -> int:
        """The pp rank holding ``stage``."""
        return stage_owner(self.schedule, self.pp, self.stages_per_rank, stage)

    def stage_modules(self, stage: int) -> tuple[str, ...]:
        """The module names stage ``stage`` holds (its blocks, and the first/last-stage modules)."""
        return stage_module_names(self.layout, self.ranges[stage], self.num_stages, stage)

    @property
    def bubble_fraction(self) -> float:
        """The schedule's idle fraction in theory (:func:`meshplan.pipeline.schedules.bubble_fraction`)."""
        return bubble_fraction(self.schedule.name, self.pp, self.microbatches, self.stages_per_rank)

    def report(self) -> dict[str, Any]:
        return {"schedule": self.schedule.name, "pp": self.pp, "microbatches": self.microbatches,
                "stages_per_rank": self.stages_per_rank, "layout": self.layout.source,
                "stages": [{"stage": s, "rank": self.owner(s), "blocks": [r.start, r.stop]}
                           for s, r in enumerate(self.ranges)],
                "bubble_fraction": round(self.bubble_fraction, 4)}


def plan_pipeline(model: nn.Module, pp: int, options: PipelineParallelOptions, registry: Registry) -> PipelinePlan:
    """Validate the pipeline options against ``model`` and decide the stages; typed errors
    (:class:`~meshplan.PipelineError` subclasses), identical on every rank, before any collective."""
    spec = resolve_schedule(options.pp_schedule)
    microbatches = options.pp_microbatches
    if microbatches is None:
        microbatches = pp * options.pp_stages_per_rank
    check_schedule(spec, pp, microbatches, options.pp_stages_per_rank)
    layout = find_layout(model, registry, options.pp_plan)
    ranges = stage_block_ranges(model, layout, pp * options.pp_stages_per_rank, options.pp_split)
    check_tied_parameters(model, layout, ranges)
    stage_loss(model, options, microbatches)  # refuses models whose loss cannot be computed per stage
    return PipelinePlan(spec, pp, microbatches, options.pp_stages_per_rank, layout, tuple(ranges))


def stage_loss(model: nn.Module, options: PipelineParallelOptions, microbatches: int) -> PipelineLoss:
    """The last stage's loss: ``pp_loss_fn`` if given, else a Hugging Face causal LM's own loss."""
    if options.pp_loss_fn is not None:
        return mean_loss(options.pp_loss_fn, microbatches)
    if not is_hf_causal_lm(model):
        raise PipelineError(f"{type(model).__qualname__} is not a Hugging Face causal LM: pass pp_loss_fn="
                            "loss_fn(output, target) (the mean loss of a microbatch) for its last stage.")
    config = model.config.get_text_config()
    if getattr(config, "output_router_logits", False):
        raise PipelineError(
            "config.output_router_logits=True: the MoE load-balancing loss is computed from every layer's router "
            "logits together, which pipeline stages do not see; set output_router_logits=False (or use pp=1).")
    return causal_lm_loss(model)


def _device(mesh: DeviceMesh) -> torch.device:
    if mesh.device_type == "cpu":
        return torch.device("cpu")
    return torch.device(mesh.device_type, torch.get_device_module(mesh.device_type).current_device())


def build_pipeline(model: nn.Module, plan: PipelinePlan, pp_mesh: DeviceMesh, options: PipelineParallelOptions,
                   parallelize_stage: Callable[[nn.Module], nn.Module]) -> PipelineModel:
    """This rank's :class:`PipelineModel`: its stages built from ``model`` (the last one in place, earlier ones as
    copies of only what they keep), each passed through ``parallelize_stage``, then torch's schedule."""
    from torch.distributed.pipelining import PipelineStage

    loss = stage_loss(model, options, plan.microbatches)
    mine = plan.stages_on(pp_mesh.get_local_rank())
    modules = []
    for position, index in enumerate(mine):
        info = StageInfo(index, plan.num_stages, plan.ranges[index])
        modules.append(parallelize_stage(build_stage(model, plan.layout, info, in_place=position == len(mine) - 1)))
    pipe = PipelineModel(modules, None, pp_mesh, plan.schedule, plan.microbatches, plan.layout, plan.ranges, loss)
    device, group = _device(pp_mesh), pp_mesh.get_group()
    stages = [PipelineStage(module, index, plan.num_stages, device, group=group)
              for module, index in zip(modules, mine)]
    try:
        schedule = plan.schedule.cls(stages if plan.schedule.multi_stage else stages[0], plan.microbatches,
                                     loss_fn=pipe.compute_loss, scale_grads=False)
    except ValueError as exc:  # a rule check_schedule does not know yet (a newer torch)
        raise PipelineScheduleError(f"torch's {plan.schedule.name} refused this layout: {exc}") from exc
    pipe.schedule = schedule
    pipe.plan = plan
    return pipe


def stage_tp_plan(stage: nn.Module, styles: Mapping[str, Any], layout: PipelineLayout,
                  sequence_parallel: bool) -> dict[str, Any]:
    """The TP plan of one stage, with fresh style objects: the entries that match something the stage holds (not
    the identities standing in for the embeddings on later stages or the head on earlier ones); entries for the
    first block (``layers.0``, where sequence parallel shards the residual stream) moved to the stage's first
    block; under sequence parallel, the last block of a non-last stage gathers the sequence again, so stages
    exchange ordinary full tensors."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import PrepareModuleOutput

    from ..tensor_parallel.custom_styles import ChainedStyles
    from ..tensor_parallel.matching import match_key
    from .stages import stage_info

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


def split_options(options: Mapping[str, Any]) -> tuple[PipelineParallelOptions, dict[str, Any]]:
    """``(pipeline options, the strategy's other options)``."""
    names = set(PipelineParallelOptions.__dataclass_fields__)
    return (PipelineParallelOptions(**{k: v for k, v in options.items() if k in names}),
            {k: v for k, v in options.items() if k not in names})


def pipeline_size(mesh: DeviceMesh, pp_mesh_name: str) -> int:
    names = mesh.mesh_dim_names or ()
    return mesh.shape[names.index(pp_mesh_name)] if pp_mesh_name in names else 1


def parallelize_pipeline(model: nn.Module, mesh: DeviceMesh, strategy: Any = "fsdp2", tp_plan: Any = None,
                         ep_plan: Any = None, **options: Any) -> PipelineModel:
    """``meshplan.parallelize`` with a ``pp`` mesh dim larger than 1: validate everything (the pipeline options and
    the strategy on the mesh without ``pp``, against the whole model), then split the model into stages and
    parallelize each with ``strategy`` on that mesh. Returns this rank's :class:`PipelineModel`."""
    from .. import api

    pp_options, rest = split_options(options)
    names = tuple(mesh.mesh_dim_names or ())
    pp = pipeline_size(mesh, pp_options.pp_mesh_name)
    if pp < 2:
        raise PipelineError(f"Pipeline parallelism needs a mesh dim {pp_options.pp_mesh_name!r} larger than 1; the "
                            f"mesh has {dict(zip(names, mesh.shape))}.")
    rest_names = tuple(n for n in names if n != pp_options.pp_mesh_name)
    if not rest_names:
        raise PipelineError(f"The mesh has only the pipeline dim {pp_options.pp_mesh_name!r}: add the strategy's "
                            "data-parallel dim, e.g. mesh_dim_names=('pp', 'dp_shard') with dp_shard=1.")
    plan = plan_pipeline(model, pp, pp_options, api.get_registry())
    rest_mesh = mesh[rest_names]
    prepared = api.prepare(model, rest_mesh, strategy, tp_plan, ep_plan, **rest)
    tp = prepared.plan

    def parallelize_stage(stage: nn.Module) -> nn.Module:
        stage_plan = None if tp is None else stage_tp_plan(stage, tp.styles, plan.layout, tp.sequence_parallel)
        return api.prepare(stage, rest_mesh, prepared.strategy, stage_plan, ep_plan, **rest).apply()

    pipe = build_pipeline(model, plan, mesh[pp_options.pp_mesh_name], pp_options, parallelize_stage)
    object.__setattr__(pipe, REPORT_ATTRIBUTE, prepared.report() | {"pipeline": plan.report()})
    return pipe


__all__: Sequence[str] = ("PipelinePlan", "build_pipeline", "parallelize_pipeline", "plan_pipeline",
                          "split_options", "stage_tp_plan")
