"""Gather many (sharded) tensors to rank 0 at once, in the model's order, with one message per rank and batch.

Every rank describes once which elements of each tensor it holds (:func:`~.shard_regions.owned_indices` as
contiguous runs, packed parameters in the model's order); the descriptions are exchanged in one small collective.
A tensor's elements are then sent by the lowest rank of each distinct shard only (replicas send nothing). For a
batch of tensors, each rank concatenates the bytes of its shards into one buffer and sends it to rank 0, which
receives the ranks' buffers one after another and places every shard's blocks in the full tensors. Whatever the
mesh (FSDP2 x TP, HSDP, EP, DDP replicas), a batch costs one point-to-point message per rank instead of one or two
all-gathers per tensor, and rank 0 holds the batch's full tensors plus one rank's buffer at a time.

Ranks may hold different tensors (the stages of a pipeline): each describes the ones it has, with their global
shape and dtype, and :attr:`Rank0Gatherer.names` lists them all (rank 0's first, then each next rank's new ones).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from .packing import PackedLayout
from .shard_regions import Run, blocks_of_runs, owned_indices, runs

#: per dim, the runs of global indices a rank's local tensor holds
ShardRuns = tuple[tuple[Run, ...], ...]


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return (tensor.to_local() if isinstance(tensor, DTensor) else tensor).detach()


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _shape(shard: ShardRuns) -> tuple[int, ...]:
    return tuple(sum(stop - start for start, stop, _ in dim_runs) for dim_runs in shard)


def _numel(shard: ShardRuns) -> int:
    return int(torch.Size(_shape(shard)).numel())


class Rank0Gatherer:
    """Collective: build it and call :meth:`gather` on every rank, with the same names in the same order (any of
    :attr:`names`, also ones a rank does not hold)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], packed: Mapping[str, PackedLayout]) -> None:
        self.tensors = tensors
        own = {name: (tuple(tensor.shape), tensor.dtype,
                      tuple(tuple(runs(indices)) for indices in owned_indices(tensor, packed.get(name))))
               for name, tensor in tensors.items()}
        self.rank = dist.get_rank() if _distributed() else 0
        self.world = dist.get_world_size() if _distributed() else 1
        described: list[dict[str, tuple[tuple[int, ...], torch.dtype, ShardRuns]]] = [own]
        if self.world > 1:
            described = [{} for _ in range(self.world)]
            dist.all_gather_object(described, own)
        #: every rank's shards, by name (absent: the rank does not hold the tensor)
        self.shards: list[dict[str, ShardRuns]] = [{name: shard for name, (_, _, shard) in part.items()}
                                                   for part in described]
        #: ``(global shape, dtype)`` of every tensor any rank holds, in :attr:`names` order
        self.meta: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        for part in described:
            for name, (shape, dtype, _) in part.items():
                self.meta.setdefault(name, (shape, dtype))
        self.names = list(self.meta)
        # the ranks that send each tensor: the first holder of each distinct, non-empty shard
        self.senders: dict[str, list[int]] = {}
        for name in self.names:
            seen: set[ShardRuns] = set()
            self.senders[name] = []
            for rank, shards in enumerate(self.shards):
                if name in shards and shards[name] not in seen and _numel(shards[name]) > 0:
                    seen.add(shards[name])
                    self.senders[name].append(rank)
        backend = dist.get_backend() if self.world > 1 else "gloo"
        self.device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")

    def _element_size(self, name: str) -> int:
        return torch.empty((), dtype=self.meta[name][1]).element_size()

    def full_bytes(self, name: str) -> int:
        return int(torch.Size(self.meta[name][0]).numel()) * self._element_size(name)

    def _sent_by(self, rank: int, names: Sequence[str]) -> list[str]:
        return [name for name in names if rank in self.senders[name]]

    def _nbytes(self, rank: int, name: str) -> int:
        return _numel(self.shards[rank][name]) * self._element_size(name)

    def gather(self, names: Sequence[str]) -> dict[str, torch.Tensor] | None:
        """On rank 0 the full tensors of ``names`` (model order, on the CPU); ``None`` on every other rank."""
        mine = self._sent_by(self.rank, names)
        if self.rank != 0:
            if mine:
                payload = torch.cat([_local(self.tensors[name]).contiguous().reshape(-1).view(torch.uint8)
                                     for name in mine])
                dist.send(payload.to(self.device), dst=0)
            return None
        full = {name: torch.empty(self.meta[name][0], dtype=self.meta[name][1]) for name in names}
        for name in mine:
            self._place(full[name], _local(self.tensors[name]).cpu(), self.shards[0][name])
        for rank in range(1, self.world):  # one buffer at a time: rank 0 holds the batch plus one rank's shards
            size = sum(self._nbytes(rank, name) for name in self._sent_by(rank, names))
            if not size:
                continue
            payload = torch.empty(size, dtype=torch.uint8, device=self.device)
            dist.recv(payload, src=rank)
            offset, payload = 0, payload.cpu()
            for name in self._sent_by(rank, names):
                size, shard = self._nbytes(rank, name), self.shards[rank][name]
                piece = payload[offset:offset + size]
                if offset % full[name].element_size():  # a view needs the dtype's alignment
                    piece = piece.clone()
                local = piece.view(full[name].dtype).reshape(_shape(shard))
                self._place(full[name], local, shard)
                offset += size
            del payload, piece, local
        return full

    @staticmethod
    def _place(full: torch.Tensor, local: torch.Tensor, shard: ShardRuns) -> None:
        for region, local_slices in blocks_of_runs(shard):
            full[tuple(slice(start, stop) for start, stop in region)] = local[local_slices]
