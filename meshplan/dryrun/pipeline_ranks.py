"""Every rank's parameters under pipeline parallelism, from one pp-free layout and the pipeline plan.

A stage is parallelized over the mesh without ``pp`` exactly as the whole model would be (the stage plans are the
whole model's plans cut to the stage, FSDP2 shards each parameter on its own), so a parameter's piece on a rank
depends only on the rank's coordinates along the other dims. ``meshplan explain`` therefore parallelizes the whole
model once on the shown rank's pp slice (no collective, no stage built), reads every parameter's per-rank table
from it (:func:`~meshplan.dryrun.all_ranks.all_ranks`), and gives each parameter to the ranks whose pp coordinate
holds its stage (:meth:`~meshplan.pipeline.plan.PipelinePlan.stages_on`). The shown rank's real stage shards
check the result.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..pipeline.plan import PipelinePlan
from ..pipeline.schedules import ZERO_BUBBLE_SCHEDULES
from .all_ranks import AllRanks, ParamGroup
from .layout import ParamLayout, state_bytes


def stage_of_parameters(plan: PipelinePlan, names: list[str]) -> dict[str, int]:
    """``{parameter name: stage}`` for every name inside a stage's modules (names outside every stage are left
    out)."""
    owner: dict[str, int] = {}
    prefixes = {module: stage for stage in range(plan.num_stages) for module in plan.stage_modules(stage)}
    for name in names:
        parts = name.split(".")
        for cut in range(len(parts) - 1, -1, -1):
            stage = prefixes.get(".".join(parts[:cut]))
            if stage is not None:
                owner[name] = stage
                break
    return owner


def pp_slices(mesh: Any, pp_dim: str, shown_pp: int) -> tuple[np.ndarray, np.ndarray]:
    """(every global rank's pp coordinate, the rank with the same other coordinates at pp coordinate
    ``shown_pp``)."""
    ranks = mesh.mesh.numpy().astype(np.int64)
    axis = list(mesh.mesh_dim_names).index(pp_dim)
    by_pp = np.moveaxis(ranks, axis, 0).reshape(ranks.shape[axis], -1)
    coordinate, counterpart = np.full(ranks.size, -1, np.int64), np.full(ranks.size, -1, np.int64)
    for p, row in enumerate(by_pp):
        coordinate[row] = p
        counterpart[row] = by_pp[shown_pp]
    return coordinate, counterpart


def pipeline_all_ranks(reference: AllRanks, plan: PipelinePlan, coordinate: np.ndarray,
                       counterpart: np.ndarray) -> AllRanks:
    """Every rank's elements with pipeline stages: ``reference`` is the pp-free layout on the shown rank's pp slice;
    ``coordinate`` / ``counterpart`` come from :func:`pp_slices`. A parameter's piece on a rank is its
    counterpart's piece when the rank's pp coordinate holds the parameter's stage, else none."""
    stage = stage_of_parameters(plan, [n for g in reference.groups for n in g.names])
    holder = {s: plan.owner(s) for s in range(plan.num_stages)}
    groups = []
    for group in reference.groups:
        by_rank = group.piece_of_rank[counterpart]
        by_holder: dict[int, list[str]] = {}
        for name in group.names:
            if name in stage:
                by_holder.setdefault(holder[stage[name]], []).append(name)
        for p, names in by_holder.items():
            groups.append(ParamGroup(names, group.shape, group.numel, group.element_size, group.trainable,
                                     group.table, np.where(coordinate == p, by_rank, -1)))
    return AllRanks(reference.world_size, groups)


def peak_in_flight(plan: PipelinePlan) -> int:
    """The most microbatches whose forward ran and whose backward has not, on pp rank 0 (the peak), counted per
    stage (a rank with ``v`` stages can hold up to ``v x m``): the warm-up of torch's schedule plus the first
    forward of its steady state. GPipe / looped BFS: every forward first; 1F1B: ``min(m, pp)``; interleaved
    (torch's ``_get_warmup_ops``): ``(v - 1) x microbatches per round + f x (pp - 1) + 1`` with ``f`` = 2 (1 for
    interleaved zero bubble); the V schedules: ``2 pp``, an estimate (rank 0's warm-up covers both ends of the V)."""
    pp, m, v = plan.pp, plan.microbatches, plan.stages_per_rank
    key = plan.schedule.key
    if key in {"gpipe", "loopedbfs"}:
        return v * m
    if key == "1f1b":
        return min(m, pp)
    if plan.schedule.v_shape:
        return min(2 * m, 2 * pp)
    per_round = m // max(1, m // pp)
    factor = 1 if key == "interleavedzerobubble" else 2
    return min(v * m, (v - 1) * per_round + factor * (pp - 1) + 1)


def pipeline_section(plan: PipelinePlan, spread: AllRanks | None, everything: list[ParamLayout],
                     coordinate: np.ndarray) -> dict[str, Any]:
    """The pipeline plan with per-stage parameter, gradient and AdamW bytes (whole stage, and the most any rank
    holding it keeps of it) and each pp rank's worst rank."""
    stage = stage_of_parameters(plan, [p.name for p in everything])
    per_rank = spread.local_by_name if spread is not None else None
    stages = []
    for s, blocks in enumerate(plan.ranges):
        mine = [p for p in everything if stage.get(p.name) == s]
        row: dict[str, Any] = {"stage": s, "pp_rank": plan.owner(s), "blocks": [blocks.start, blocks.stop],
                               "parameters": sum(p.numel for p in mine),
                               "bytes": state_bytes(mine, {p.name: p.numel for p in mine})}
        stages.append(row)
    pp_ranks = []
    if spread is not None and per_rank is not None:
        for p in range(plan.pp):
            ranks = np.where(coordinate == p)[0]
            worst = int(ranks[np.argmax(spread.per_rank[ranks])])
            pp_ranks.append({"pp_rank": p, "stages": plan.stages_on(p), "worst_rank": worst,
                             "local": int(spread.per_rank[worst]),
                             "bytes": state_bytes(everything, per_rank(worst))})
    return plan.report() | {"zero_bubble": plan.schedule.key in ZERO_BUBBLE_SCHEDULES,
                            "peak_in_flight_microbatches": peak_in_flight(plan),
                            "stages": stages, "pp_ranks": pp_ranks}
