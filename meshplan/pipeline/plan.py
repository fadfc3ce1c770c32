"""What pipeline parallelism decided for a model (collective-free): schedule, microbatches, stages and owners."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .schedules import ScheduleSpec, bubble_fraction, stage_indices, stage_owner
from .split import PipelineLayout, stage_module_names


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
