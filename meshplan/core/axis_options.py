"""Options of the parallel axes a strategy may support, one mixin per axis.

A strategy that declares an axis in ``Strategy.supports`` builds its options class from that axis's mixin::

    @dataclass
    class MyOptions(ContextParallelOptions, ExpertParallelOptions):
        ...

    class MyStrategy(ComposedStrategy):
        supports = frozenset({"tp", "cp", "ep"})
        options_class = MyOptions

Why mixins: every strategy supporting an axis then spells its options the same way (one ``ep_size``, one
``cp_mesh_name``), the dispatcher reads them through a type rather than by guessing from option names, the
axis's mesh role comes with them (:meth:`mesh_roles`), and ``meshplan strategies`` lists them like any other
option. Whether an axis is *on* is decided by ``supports`` and the mesh or sizes, never by an option's name.
``PipelineParallelOptions`` (``pp_mesh_name``) joins them with the pipeline axis.
"""

from __future__ import annotations

from dataclasses import dataclass

from .roles import RoleDims, role_dims
from .strategy import StrategyOptions

#: Context-parallel dims tried after ``cp_mesh_name``.
CP_DIM_FALLBACKS = ("cp",)


@dataclass
class ExpertParallelOptions(StrategyOptions):
    """Expert parallelism.

    Attributes:
        ep_size: 1 = off. The experts of every MoE layer are split over ``ep_size`` ranks carved from the
            data-parallel shard ranks (and the TP ranks when the TP plan leaves the experts whole;
            :mod:`meshplan.core.roles`); the strategy receives the EP plan as ``plans.ep``. The plan comes from
            the model's plan providers (the Hugging Face fallback reads ``config.base_model_ep_plan``) or
            ``ep_plan=...``.
    """

    ep_size: int = 1


@dataclass
class ContextParallelOptions(StrategyOptions):
    """Context parallelism: the sequence is split over the ``cp`` mesh dim.

    Attributes:
        cp_mesh_name: context-parallel mesh dim (``"cp"`` is tried after it).
        cp_implementation: with a ``cp`` dim > 1, how attention sees the whole sequence: ``"allgather"``
            (default: keys and values all-gathered, wraps the model's eager/SDPA attention on any device) or
            ``"ring"`` (torch's ring attention; CUDA, SDPA, plain causal masks) or ``"external"`` (the model
            is left as it is: the training loop runs CP itself, e.g. with torch's ``context_parallel`` context
            manager). See :mod:`meshplan.context_parallel`.
    """

    cp_mesh_name: str = "cp"
    cp_implementation: str = "allgather"

    def mesh_roles(self) -> dict[str, RoleDims]:
        return super().mesh_roles() | {"cp": role_dims("cp_mesh_name", self.cp_mesh_name, *CP_DIM_FALLBACKS)}
