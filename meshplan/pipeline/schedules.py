"""torch's pipeline schedules by name: which exist, what microbatch counts and stages per rank each can use,
which stages a rank holds, and the theoretical bubble of each.

The names are torch's own (``torch.distributed.pipelining`` exports every schedule as ``Schedule<Name>``:
``GPipe``, ``1F1B``, ``Interleaved1F1B``, ``LoopedBFS``, ``InterleavedZeroBubble``, ``ZBVZeroBubble``,
``DualPipeV``), matched case-insensitively with ``-`` / ``_`` ignored. The checks here mirror the ones torch's
constructors make, so a bad combination raises :class:`PipelineScheduleError` on every rank before any stage
is built or any collective runs.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from ..core.errors import PipelineScheduleError
from ..core.naming import did_you_mean

#: Schedules that place stages ``rank`` and ``2 * pp - 1 - rank`` on a rank (a "V"); the others loop
#: (stage ``s`` on rank ``s % pp``).
V_SCHEDULES = frozenset({"zbvzerobubble", "dualpipev"})
#: Schedules whose backward splits into input and weight gradients (the zero-bubble family).
ZERO_BUBBLE_SCHEDULES = frozenset({"interleavedzerobubble", "zbvzerobubble", "dualpipev"})


def _key(name: str) -> str:
    return name.replace("-", "").replace("_", "").lower()


@functools.cache
def schedule_classes() -> dict[str, type]:
    """``{torch name: schedule class}`` for every schedule torch exports (imported on first use)."""
    import torch.distributed.pipelining as pipelining  # heavy: only when pipeline parallelism is used

    prefix = "Schedule"
    return {name[len(prefix):]: getattr(pipelining, name) for name in pipelining.__all__ if name.startswith(prefix)}


def schedule_names() -> list[str]:
    """torch's schedule names, as accepted by ``pp_schedule``."""
    return sorted(schedule_classes())


@dataclass(frozen=True)
class ScheduleSpec:
    """A schedule chosen by name, with what it needs: ``multi_stage`` (takes a list of stages), ``v_shape``."""

    name: str
    cls: type
    multi_stage: bool
    v_shape: bool

    @property
    def key(self) -> str:
        return _key(self.name)


def resolve_schedule(name: str) -> ScheduleSpec:
    """The schedule named ``name``; :class:`PipelineScheduleError` listing the names when unknown."""
    from torch.distributed.pipelining.schedules import PipelineScheduleMulti  # loaded on use: keeps start-up light

    classes = schedule_classes()
    by_key = {_key(n): n for n in classes}
    if not isinstance(name, str) or _key(name) not in by_key:
        raise PipelineScheduleError(
            f"Unknown pipeline schedule {name!r}. torch provides: {', '.join(schedule_names())}."
            f"{did_you_mean(str(name), classes)}")
    torch_name = by_key[_key(name)]
    cls = classes[torch_name]
    return ScheduleSpec(torch_name, cls, issubclass(cls, PipelineScheduleMulti), _key(name) in V_SCHEDULES)


def check_schedule(spec: ScheduleSpec, pp: int, microbatches: int, stages_per_rank: int) -> None:
    """:class:`PipelineScheduleError` unless ``spec`` runs ``microbatches`` with ``stages_per_rank`` stages on each
    of ``pp`` ranks (the rules torch's constructors apply)."""
    where = f"schedule {spec.name!r} with pp={pp}, pp_stages_per_rank={stages_per_rank}"
    if not isinstance(microbatches, int) or isinstance(microbatches, bool) or microbatches < 1:
        raise PipelineScheduleError(f"pp_microbatches must be a positive integer, got {microbatches!r}.")
    if not isinstance(stages_per_rank, int) or isinstance(stages_per_rank, bool) or stages_per_rank < 1:
        raise PipelineScheduleError(f"pp_stages_per_rank must be a positive integer, got {stages_per_rank!r}.")
    if not spec.multi_stage and stages_per_rank != 1:
        raise PipelineScheduleError(
            f"{where}: {spec.name} runs one stage per rank; use pp_stages_per_rank=1 or an interleaved / V schedule "
            f"({', '.join(n for n in schedule_names() if resolve_schedule(n).multi_stage)}).")
    if spec.v_shape and stages_per_rank != 2:
        raise PipelineScheduleError(f"{where}: {spec.name} needs exactly 2 stages per rank (pp_stages_per_rank=2).")
    stages = pp * stages_per_rank
    if spec.key in {"1f1b", "dualpipev"} and microbatches < stages:
        raise PipelineScheduleError(
            f"{where}: {spec.name} needs at least as many microbatches as stages ({stages}), got {microbatches}.")
    if spec.key in {"interleaved1f1b", "interleavedzerobubble"}:
        rounds = max(1, microbatches // pp)
        if microbatches % rounds:
            raise PipelineScheduleError(
                f"{where}: {spec.name} needs the microbatches to be a multiple of the rounds "
                f"(max(1, microbatches // pp) = {rounds}), got {microbatches}; try {pp * rounds}.")


def stage_indices(spec: ScheduleSpec, pp: int, stages_per_rank: int, rank: int) -> list[int]:
    """The stages ``rank`` (its index in the pp group) holds, in increasing order."""
    if spec.v_shape:
        return [rank, 2 * pp - 1 - rank]
    return [rank + pp * k for k in range(stages_per_rank)]


def stage_owner(spec: ScheduleSpec, pp: int, stages_per_rank: int, stage: int) -> int:
    """The pp rank that holds ``stage``."""
    return next(r for r in range(pp) if stage in stage_indices(spec, pp, stages_per_rank, r))


def bubble_fraction(schedule: str, pp: int, microbatches: int, stages_per_rank: int = 1) -> float:
    """The idle fraction of a step in theory, with equal stages and a backward twice the forward.

    GPipe and 1F1B: ``(pp - 1) / (m + pp - 1)``; interleaved / looped (``v`` stages per rank):
    ``(pp - 1) / (v m + pp - 1)``; zero-bubble schedules split the backward into an input part and a weight part
    (one forward each) and fill the warm-up/cool-down with weight gradients: ``(pp - 1) / (3 v m + pp - 1)``
    (the ZB-H1 figure, Qi et al. 2023), an upper bound for the V schedules.
    """
    spec = resolve_schedule(schedule)
    check_schedule(spec, pp, microbatches, stages_per_rank)
    work = stages_per_rank * microbatches
    if spec.key in ZERO_BUBBLE_SCHEDULES:
        work *= 3
    return (pp - 1) / (work + pp - 1)
