"""The meshes of expert parallelism, carved from the data-parallel (and TP) ranks; see :mod:`meshplan.core.roles`.

Only ``DeviceMesh`` layout operations are used (flatten, unflatten, concatenate of :mod:`meshplan.core.torch_private`):
no global rank list is built, so carving runs on fake process groups of thousands of ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh

from .errors import ExpertParallelError
from .mesh import DataParallelMesh
from .torch_private import concatenate, flatten, unflatten

EP_DIM, EXPERT_DP_DIM = "ep", "expert_dp_shard"


@dataclass(frozen=True)
class ExpertMeshes:
    """The meshes of expert parallelism (see :mod:`meshplan.core.roles`).

    ``token_mesh`` is the TP mesh when the EP group borrowed it (its ranks hold the same tokens and each
    dispatches a slice of them), else ``None``. ``borrowed`` names the dims ``ep`` was carved from.
    """

    ep: DeviceMesh
    data_parallel: DataParallelMesh
    token_mesh: DeviceMesh | None
    borrowed: tuple[str, ...]

    def describe(self) -> str:
        return (f"EP ep={self.ep.size()} from {' x '.join(self.borrowed)}; experts {self.data_parallel.describe()}"
                + (", TP ranks dispatch disjoint token slices" if self.token_mesh is not None else ""))


def check_expert_parallel_size(ep_size: int, shard_size: int, tp_size: int, origin: str) -> None:
    """:class:`ExpertParallelError` unless ``ep_size`` divides the ``shard_size x tp_size`` ranks it borrows and,
    borrowing TP ranks (``tp_size > 1``), is a multiple of the TP size (a TP group never straddles two EP
    groups). ``origin`` names the borrowed dims in the message."""
    pool = shard_size * tp_size
    if pool % ep_size:
        divisors = [d for d in range(1, pool + 1) if pool % d == 0 and d % tp_size == 0]
        raise ExpertParallelError(
            f"ep_size={ep_size} must divide the {pool} ranks expert parallelism borrows ({origin}); "
            f"possible ep_size values: {divisors}.")
    if ep_size % tp_size:
        raise ExpertParallelError(
            f"ep_size={ep_size} must be a multiple of the TP size {tp_size}: the experts are not TP-sharded, so the "
            f"EP group takes whole TP groups ({origin}); use ep_size in "
            f"{[d for d in range(tp_size, pool + 1, tp_size) if pool % d == 0]}, or shard the experts by TP.")


def carve_expert_meshes(dense: DataParallelMesh, ep_size: int, tp: DeviceMesh | None,
                        borrowed: tuple[str, ...]) -> ExpertMeshes:
    """Split the dense data-parallel shard ranks (times ``tp``'s ranks when given: experts not TP-sharded) into
    ``(expert data parallel, ep)``; see :mod:`meshplan.core.roles`. Sizes are checked by
    :meth:`MeshRoles.check_expert_parallel` before any collective."""
    shard = dense.mesh[dense.shard_name] if dense.is_hybrid else dense.mesh
    if tp is not None and tp.size() > 1:
        pool = flatten(concatenate([shard, tp]), f"{dense.shard_name}_{EP_DIM}_pool")
    else:
        pool, tp = shard, None
    split = unflatten(pool, 0, (pool.size() // ep_size, ep_size), (EXPERT_DP_DIM, EP_DIM))
    ep, expert_dp = split[EP_DIM], split[EXPERT_DP_DIM]
    if dense.is_hybrid:
        hybrid = concatenate([dense.mesh[dense.replicate_name], expert_dp])
        data_parallel = DataParallelMesh(hybrid, EXPERT_DP_DIM, expert_dp.size(), dense.replicate_name,
                                         dense.replicate_size)
    else:
        data_parallel = DataParallelMesh(expert_dp, EXPERT_DP_DIM, expert_dp.size())
    return ExpertMeshes(ep, data_parallel, tp, borrowed)


def dense_data_parallel_size(dense: DataParallelMesh) -> int:
    """How many ranks see different data: the divisor of every gradient average (the experts' too)."""
    return dense.shard_size * dense.replicate_size
