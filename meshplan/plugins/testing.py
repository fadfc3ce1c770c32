"""Test helpers for meshplan and for plugin authors.

* :func:`isolated_registry` — runtime registrations made inside are undone on exit.
* :class:`RankPool` / :func:`run_on_ranks` — run a function on N ``gloo`` ranks on CPU and collect each
  rank's result, or re-raise the failure naming the rank. A pool keeps its processes (and their
  imports and process group) between calls, so a test suite pays start-up once.
* :func:`fake_process_group` — a ``backend="fake"`` process group of any size in this process, for
  meshes of thousands of ranks on the meta device (defined in :mod:`meshplan.core.fake_pg`).
* :class:`TensorParallelOnly` (strategy ``"tp_test"``) and :func:`tp_mesh` — test a TP plan alone: the plan is
  resolved and validated exactly as ``meshplan.parallelize`` does, then applied with no data-parallel
  wrapping, so the TP model can be compared with the unsharded one::

      meshplan.register_strategy(TensorParallelOnly)
      model = meshplan.parallelize(model, tp_mesh(), strategy="tp_test", tp_plan=my_plan)
"""

from __future__ import annotations

import contextlib
import os
import pickle
import queue
import socket
import traceback
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from ..core.fake_pg import fake_process_group
from ..core.plans import PlanSet
from ..core.roles import MeshRoles
from ..core.strategy import StrategyOptions
from ..strategies.composition import ComposedStrategy, Composition
from . import manager

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

__all__ = ["RankError", "RankPool", "TensorParallelOnly", "fake_process_group", "free_port", "isolated_registry",
           "run_on_ranks", "tp_mesh"]


@contextlib.contextmanager
def isolated_registry() -> Iterator[None]:
    """Start from freshly discovered plugins and restore the previous state on exit."""
    saved = manager._host
    manager.reset()
    try:
        yield
    finally:
        manager._host = saved


class RankError(RuntimeError):
    """One or more ranks raised; ``errors`` maps rank -> exception (or its description)."""

    def __init__(self, errors: dict[int, BaseException], tracebacks: dict[int, str]) -> None:
        self.errors = errors
        self.tracebacks = tracebacks
        first = min(errors)
        lines = [f"rank {r} raised {type(e).__name__}: {e}" for r, e in sorted(errors.items())]
        super().__init__("\n".join(lines) + f"\n--- traceback of rank {first} ---\n{tracebacks[first]}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _transportable(exc: BaseException) -> BaseException:
    """``exc`` if it survives a pickle round trip (as the parent will need), else a description of it."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001 - any failure means: send a description instead
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def _worker(rank: int, world_size: int, port: int, inbox: Any, outbox: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=120))
    while True:
        task = inbox.get()
        if task is None:
            break
        fn, args, kwargs = task
        manager.reset()
        try:
            outbox.put((rank, True, fn(*args, **kwargs), None))
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            outbox.put((rank, False, _transportable(exc), traceback.format_exc()))
    dist.destroy_process_group()


class RankPool:
    """``world_size`` gloo ranks that run functions on request (functions must be importable)."""

    def __init__(self, world_size: int) -> None:
        ctx = mp.get_context("spawn")
        self.world_size = world_size
        self._outbox = ctx.Queue()
        self._inboxes = [ctx.Queue() for _ in range(world_size)]
        port = free_port()
        self._procs = [
            ctx.Process(target=_worker, args=(r, world_size, port, self._inboxes[r], self._outbox), daemon=True)
            for r in range(world_size)
        ]
        for proc in self._procs:
            proc.start()

    @property
    def alive(self) -> bool:
        return all(p.is_alive() for p in self._procs)

    def run(self, fn: Callable[..., Any], *args: Any, timeout: float = 300, **kwargs: Any) -> list[Any]:
        """``fn(*args, **kwargs)`` on every rank; returns results by rank or raises :class:`RankError`."""
        for inbox in self._inboxes:
            inbox.put((fn, args, kwargs))
        results: dict[int, Any] = {}
        errors: dict[int, BaseException] = {}
        tracebacks: dict[int, str] = {}
        while len(results) + len(errors) < self.world_size:
            try:
                rank, ok, payload, tb = self._outbox.get(timeout=timeout)
            except queue.Empty:
                missing = sorted(set(range(self.world_size)) - set(results) - set(errors))
                self.close(force=True)
                raise TimeoutError(f"ranks {missing} did not finish {fn.__name__} within {timeout} s "
                                   f"(finished: {sorted(results)}, failed: {sorted(errors)})") from None
            if ok:
                results[rank] = payload
            else:
                errors[rank], tracebacks[rank] = payload, tb
        if errors:
            raise RankError(errors, tracebacks)
        return [results[r] for r in range(self.world_size)]

    def close(self, force: bool = False) -> None:
        for proc, inbox in zip(self._procs, self._inboxes):
            if force:
                proc.kill()
            elif proc.is_alive():
                inbox.put(None)
        for proc in self._procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()


def run_on_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 300, **kwargs: Any) -> list:
    """Run ``fn`` once on ``world_size`` fresh gloo ranks (a :class:`RankPool` that is closed afterwards)."""
    pool = RankPool(world_size)
    try:
        return pool.run(fn, *args, timeout=timeout, **kwargs)
    finally:
        pool.close(force=not pool.alive)


class TensorParallelOnly(ComposedStrategy):
    """Strategy ``"tp_test"``: apply the resolved, validated TP plan (the shared order, with no data-parallel
    wrapping), to test a plan on its own. Register it with ``meshplan.register_strategy(TensorParallelOnly)``."""

    name = "tp_test"  # not "tp_only": the example strategy plugin uses that name
    supports = frozenset({"tp"})
    description = "tensor parallelism only (for testing TP plans)"

    def wrap_data_parallel(self, model: nn.Module, roles: MeshRoles, plans: PlanSet, options: StrategyOptions,
                           validated: Any, done: Composition) -> nn.Module:
        return model


def tp_mesh(device_type: str = "cpu") -> DeviceMesh:
    """A 1-D mesh named ``"tp"`` over every rank of the default process group."""
    from torch.distributed.device_mesh import init_device_mesh  # loaded on use: keeps start-up light

    return init_device_mesh(device_type, (dist.get_world_size(),), mesh_dim_names=("tp",))
