"""The pipeline-parallel options a strategy that declares ``pp`` takes (an axis-option mixin, like
:class:`~meshplan.core.axis_options.ExpertParallelOptions`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..core.roles import RoleDims, pipeline_role
from ..core.strategy import StrategyOptions


@dataclass
class PipelineParallelOptions(StrategyOptions):
    """Pipeline parallelism over the ``pp`` mesh dim (off when the dim is absent or has size 1).

    Attributes:
        pp_mesh_name: the pipeline mesh dim.
        pp_schedule: one of torch's schedules by name (``GPipe``, ``1F1B``, ``Interleaved1F1B``, ``LoopedBFS``,
            ``InterleavedZeroBubble``, ``ZBVZeroBubble``, ``DualPipeV``; case-insensitive).
        pp_microbatches: microbatches per step (``None``: as many as stages); the local batch must split evenly.
        pp_stages_per_rank: stages on each rank (virtual stages); 2 for the V schedules, 2 or more for the
            interleaved / looped ones.
        pp_split: the first block of stages 1..S-1 (S = pp x pp_stages_per_rank), increasing; ``None``: a
            split balanced by parameter count (embeddings count on the first stage, norm and head on the last).
        pp_plan: the model's split as module names in order (one of them the block container); ``None``: a plan
            provider's ``pp`` entry (``{"tp": ..., "pp": [...]}``), else Hugging Face's ``base_model_pp_plan``.
        pp_loss_fn: ``loss_fn(output, target)``, the mean loss of a microbatch, for models that are not Hugging
            Face causal LMs (those use their own next-token loss).
    """

    pp_mesh_name: str = "pp"
    pp_schedule: str = "1F1B"
    pp_microbatches: int | None = None
    pp_stages_per_rank: int = 1
    pp_split: Sequence[int] | None = None
    pp_plan: Sequence[str] | None = None
    pp_loss_fn: Callable[..., Any] | None = None

    def mesh_roles(self) -> dict[str, RoleDims]:
        return super().mesh_roles() | {"pp": pipeline_role(self.pp_mesh_name)}
