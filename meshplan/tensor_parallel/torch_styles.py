"""Factories of torch's built-in styles under meshplan's style names (see :mod:`meshplan.tensor_parallel.vocabulary`).

Imported when a style is first made, not at plugin discovery: DTensor is a heavy import.
"""

from __future__ import annotations

from torch.distributed.tensor import Partial, Replicate
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
)


def colwise() -> ParallelStyle:
    return ColwiseParallel()


def rowwise() -> ParallelStyle:
    return RowwiseParallel()


def colwise_gather_output() -> ParallelStyle:
    return ColwiseParallel(output_layouts=Replicate())


def rowwise_split_input() -> ParallelStyle:
    return RowwiseParallel(input_layouts=Replicate())


def sequence_parallel() -> ParallelStyle:
    return SequenceParallel()


def embedding_colwise() -> ParallelStyle:
    return ColwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())


def all_reduce() -> ParallelStyle:
    return PrepareModuleOutput(output_layouts=Partial(), desired_output_layouts=Replicate(), use_local_output=True)
