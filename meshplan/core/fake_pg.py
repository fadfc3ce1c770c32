"""A fake (no-communication) default process group: meshes of any size in one process.

``meshplan explain`` and tests use it to run the real parallelize path for thousands of ranks on
the meta device. Collectives on it return immediately without moving data.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch.distributed as dist

from .errors import UnsupportedConfigurationError


@contextlib.contextmanager
def fake_process_group(world_size: int, rank: int = 0) -> Iterator[None]:
    """A ``backend="fake"`` default process group of ``world_size`` ranks, as ``rank``, for the block."""
    if dist.is_initialized():
        raise UnsupportedConfigurationError(
            "A default process group already exists in this process; a fake world of "
            f"{world_size} ranks needs its own. Run this outside a distributed job (e.g. `meshplan explain`)."
        )
    if world_size < 1 or not 0 <= rank < world_size:
        raise UnsupportedConfigurationError(f"Rank {rank} is not in a world of {world_size} ranks.")
    dist.init_process_group("fake", rank=rank, world_size=world_size)  # the fake backend needs no store
    try:
        yield
    finally:
        dist.destroy_process_group()
