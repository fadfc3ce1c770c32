"""Run a function on N CUDA ranks with NCCL (one process per GPU) and return each rank's result.

Used by the tests marked ``gpu`` (``make gpu-check`` runs them); on a machine with fewer CUDA devices the tests
skip before calling it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any


def _rank_main(rank: int, world: int, port: int, fn: Callable[..., Any], args: tuple, results) -> None:  # noqa: ANN001
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world)
    try:
        results.put((rank, fn(*args)))
    except Exception as exc:  # noqa: BLE001 - reported to the test process with the rank named
        results.put((rank, RuntimeError(f"rank {rank}: {type(exc).__name__}: {exc}")))
    finally:
        dist.destroy_process_group()


def run_on_gpus(fn: Callable[..., Any], *args: Any, world: int = 2, timeout: float = 300.0) -> list[Any]:
    """``fn(*args)`` on ``world`` NCCL ranks (rank ``r`` on ``cuda:r``); the results in rank order. A rank's
    exception is raised here, naming the rank."""
    import torch.multiprocessing as mp

    from meshplan.plugins.testing import free_port

    results = mp.get_context("spawn").Queue()
    ranks = mp.start_processes(_rank_main, args=(world, free_port(), fn, args, results), nprocs=world,
                               start_method="spawn", join=False)
    got = dict(results.get(timeout=timeout) for _ in range(world))
    while not ranks.join():
        pass
    for rank in range(world):
        if isinstance(got[rank], BaseException):
            raise got[rank]
    return [got[rank] for rank in range(world)]
