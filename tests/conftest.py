"""Shared fixtures: registry isolation, persistent gloo rank pools, fake process groups."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from meshplan.plugins.testing import RankPool, fake_process_group, isolated_registry

_pools: dict[int, RankPool] = {}


def _pool(world_size: int) -> RankPool:
    pool = _pools.get(world_size)
    if pool is None or not pool.alive:
        pool = _pools[world_size] = RankPool(world_size)
    return pool


@pytest.fixture
def ranks2() -> RankPool:
    """Two gloo ranks on CPU, kept alive across tests."""
    return _pool(2)


@pytest.fixture
def ranks4() -> RankPool:
    """Four gloo ranks on CPU, kept alive across tests."""
    return _pool(4)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    for pool in _pools.values():
        pool.close(force=not pool.alive)


@pytest.fixture(autouse=True)
def _isolated_registry() -> Iterator[None]:
    with isolated_registry():
        yield


@pytest.fixture
def fake_pg():
    """``with fake_pg(world_size): ...`` builds a fake process group of that size in this process."""
    return fake_process_group
