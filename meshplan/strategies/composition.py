"""The one composition order every built-in strategy follows, as a template method.

:meth:`ComposedStrategy.parallelize` runs, in this order and nowhere else:

1. :meth:`~ComposedStrategy.split_pipeline_stages`: with a ``pp`` dim > 1 (strategies that declare ``"pp"``), the
   model is split into this rank's pipeline stages (:mod:`meshplan.pipeline`), each stage runs steps 2-7 with
   its own share of the plans, and the result is a :class:`~meshplan.PipelineModel`;
2. tensor parallel with ``plans.tp`` on ``roles.tp`` (also re-ties parameters shared before TP);
3. context parallel on ``roles.cp`` (options from :class:`~meshplan.core.axis_options.ContextParallelOptions`;
   a strategy whose CP only shards parameters, as Megatron-FSDP's, leaves attention to the training loop);
4. expert parallel with ``plans.ep`` on the carved EP meshes (``roles.expert_meshes()``);
5. activation checkpointing of the blocks (options from :class:`~meshplan.activation_checkpointing.
   CheckpointingOptions`);
6. :meth:`~ComposedStrategy.compile_regions`: regional compilation of each block (``compile=True``);
7. :meth:`~ComposedStrategy.wrap_data_parallel`: the strategy's own part (FSDP2, DDP, Megatron-FSDP, nothing).

The model's blocks are found once, before the model-parallel steps (checkpointing may replace a block by its
wrapper: look blocks up again by name), and reach the wrapping step with what the steps did (:class:`Composition`).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..activation_checkpointing import Blocks, CheckpointingOptions
from ..core.axis_options import ContextParallelOptions
from ..core.errors import UnsupportedConfigurationError
from ..core.plans import PlanSet
from ..core.roles import MeshRoles
from ..core.strategy import Strategy, StrategyOptions
from ..introspection.blocks import find_blocks
from ..pipeline.options import PipelineParallelOptions


@dataclass
class Composition:
    """What the model-parallel steps did, for the data-parallel wrapping.

    Attributes:
        blocks: ``(fqn, block)`` of the model's repeated blocks, found before any step.
        experts: the experts modules expert parallelism split (empty without EP).
        checkpointed: names of the modules activation checkpointing wrapped.
    """

    blocks: Blocks
    experts: list[nn.Module] = field(default_factory=list)
    checkpointed: list[str] = field(default_factory=list)


class ComposedStrategy(Strategy):
    """A strategy in the shared order (module docstring); subclasses implement :meth:`wrap_data_parallel`.

    :meth:`validate` runs the checks of the shared steps (context parallelism, activation checkpointing);
    a subclass that overrides it calls ``super().validate(...)`` and returns what it computed."""

    def validate(self, model: nn.Module, roles: MeshRoles, plans: PlanSet, options: StrategyOptions) -> Any:
        if roles.cp is not None and isinstance(options, ContextParallelOptions):
            from ..context_parallel import validate_context_parallel  # attention internals: imported with CP

            validate_context_parallel(model, options.cp_implementation, roles.mesh.device_type)
        if isinstance(options, CheckpointingOptions):
            options.check_checkpointing(find_blocks(model))
        if roles.pp is not None and isinstance(options, PipelineParallelOptions):
            from ..pipeline.apply import plan_pipeline  # loaded on use: keeps start-up light

            plan_pipeline(model, roles.size("pp"), options, plans.pp)  # a bad split or schedule: typed errors now
        return None

    def parallelize(self, model: nn.Module, roles: MeshRoles, plans: PlanSet, options: StrategyOptions,
                    validated: Any) -> nn.Module:
        """The shared order; returns what :meth:`wrap_data_parallel` returns (a ``PipelineModel`` of the wrapped
        stages with a pipeline)."""
        return self.split_pipeline_stages(
            model, roles, plans, options,
            lambda stage, stage_plans: self.compose(stage, roles, stage_plans, options, validated))

    def compose(self, model: nn.Module, roles: MeshRoles, plans: PlanSet, options: StrategyOptions,
                validated: Any) -> nn.Module:
        """Steps 2-7 of the shared order on ``model`` (a whole model, or one pipeline stage)."""
        done = Composition(find_blocks(model))
        if plans.tp is not None:
            from ..tensor_parallel.apply import apply_tensor_parallel  # DTensor: imported on use

            apply_tensor_parallel(model, roles.tp, plans.tp)
        if roles.cp is not None and isinstance(options, ContextParallelOptions):
            from ..context_parallel import apply_context_parallel  # loaded on use: keeps start-up light

            apply_context_parallel(model, roles.cp, options.cp_implementation, validate=False)
        if plans.ep is not None:
            from ..experts.apply import apply_expert_parallel  # DTensor: imported on use

            done.experts = apply_expert_parallel(model, plans.ep, roles.expert_meshes())
        if isinstance(options, CheckpointingOptions):
            done.checkpointed = options.apply_checkpointing(model, done.blocks)
        model = self.compile_regions(model, roles, options, done)
        return self.wrap_data_parallel(model, roles, plans, options, validated, done)

    def split_pipeline_stages(self, model: nn.Module, roles: MeshRoles, plans: PlanSet, options: StrategyOptions,
                              compose: Callable[[nn.Module, PlanSet], nn.Module]) -> nn.Module:
        """Pipeline-parallel step, before every other one. Without a ``pp`` dim > 1: ``compose(model, plans)``.
        With one: this rank's stages of ``model`` (``plans.pp`` and ``roles.pp`` say how), each passed through
        ``compose`` with its own cut of the plans, in a :class:`~meshplan.PipelineModel`."""
        if roles.pp is None:
            return compose(model, plans)
        from ..pipeline.apply import parallelize_stages  # loaded on use: keeps start-up light

        return parallelize_stages(model, roles, plans, _pipeline_options(self, options), compose)

    def compile_regions(self, model: nn.Module, roles: MeshRoles, options: StrategyOptions,
                        done: Composition) -> nn.Module:
        """Regional-compile slot, after activation checkpointing and before data-parallel wrapping: with
        ``compile=True`` each block is compiled in place (:func:`meshplan.training.compile.compile_blocks`)."""
        if isinstance(options, CheckpointingOptions) and options.compile:
            from ..training.compile import compile_blocks  # the training helpers load only when asked for

            compile_blocks(model, done.blocks)
        return model

    @abstractmethod
    def wrap_data_parallel(self, model: nn.Module, roles: MeshRoles, plans: PlanSet, options: StrategyOptions,
                           validated: Any, done: Composition) -> nn.Module:
        """The strategy's own part: wrap the model-parallel ``model`` for data parallelism and return it."""


def _pipeline_options(strategy: Strategy, options: StrategyOptions) -> PipelineParallelOptions:
    """``options`` as pipeline options; :class:`UnsupportedConfigurationError` for a strategy that declares ``"pp"``
    without them (its author's mistake)."""
    if not isinstance(options, PipelineParallelOptions):
        raise UnsupportedConfigurationError(
            f"Strategy {strategy.name!r} has a pipeline role but its options {type(options).__name__} do not derive "
            "from meshplan.PipelineParallelOptions (pp_schedule, pp_microbatches, ...).")
    return options
