"""Vocab-parallel embedding (``embedding_rowwise``), also for an embedding whose forward applies child modules."""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import RowwiseParallel

from .protocol import ParamSplit, Placements, Style


class _LocalRowsLookup(nn.Embedding):
    """The lookup of a vocab-parallel embedding in this rank's rows, as a ``Partial`` DTensor (ids of other ranks'
    rows give zeros; the sum over ranks is the full lookup). It is what DTensor's own embedding computes, without its
    ``MaskPartial`` placement: that placement keeps the mask of the last lookup, and under whole-model
    ``torch.compile`` of an FSDP2 model the mask of one trace meets the next trace's fake tensors (torch 2.13:
    ``BackendCompilerFailed ... Mixing fake modes NYI``). Mixed into the embedding's class after its own class, so an
    ``nn.Embedding`` subclass whose forward calls ``super().forward`` (a scaled or normalized embedding) looks up
    here too."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if (not isinstance(weight, DTensor) or weight.placements != (Shard(0),) or self.max_norm is not None
                or self.scale_grad_by_freq or self.sparse):
            return super().forward(input)  # renormalizing or counting rows needs every id: DTensor's lookup
        ids = input.to_local() if isinstance(input, DTensor) else input
        mesh, rows = weight.device_mesh, weight.to_local()
        start = mesh.get_local_rank() * -(-weight.shape[0] // mesh.size())  # Shard(0) splits as torch.chunk does
        stop = start + rows.shape[0]
        outside = (ids < start) | (ids >= stop)
        pad = self.padding_idx  # a row of this rank's, or none
        padding = pad - start if pad is not None and start <= pad < stop else None
        lookup = F.embedding((ids - start).masked_fill(outside, 0), rows, padding)
        return DTensor.from_local(lookup.masked_fill(outside.unsqueeze(-1), 0), mesh, [Partial()], run_check=False)


@functools.cache
def _with_local_lookup(cls: type[nn.Embedding]) -> type[nn.Embedding]:
    """``cls`` with :class:`_LocalRowsLookup` after it in the MRO: one class per embedding class, named as FSDP2
    names its own (``TPEmbedding``)."""
    if issubclass(cls, _LocalRowsLookup):
        return cls
    bases = (_LocalRowsLookup,) if cls is nn.Embedding else (cls, _LocalRowsLookup)
    return type(f"TP{cls.__name__}", bases, {"__module__": cls.__module__})


class VocabParallelEmbedding(Style, RowwiseParallel):
    """Vocab-parallel ``nn.Embedding`` (``embedding_rowwise``): the weight is sharded along the vocabulary
    (``Shard(0)``), the replicated input ids look up this rank's rows and the lookup is all-reduced.

    Unlike torch's ``RowwiseParallel`` it also takes an ``nn.Embedding`` subclass whose forward passes the lookup
    through child modules (Inkling's embedding + RMSNorm): only the module's own parameters are sharded, and the
    lookup is all-reduced before a child sees it, so the children (whose parameters torch makes replicated DTensors)
    run replicated on the full embedding. Without children it is torch's vocab-parallel embedding, with the lookup of
    :class:`_LocalRowsLookup` (the module's class becomes a subclass of its own that adds it), which whole-model
    ``torch.compile`` can trace under FSDP2."""

    module_types = (nn.Embedding,)
    shards_parameters = True

    def __init__(self, *, use_local_output: bool = True) -> None:
        super().__init__(input_layouts=Replicate(), use_local_output=use_local_output)

    def placements(self, module: nn.Module) -> Placements | None:
        return {name: ParamSplit(0) for name, _ in module.named_parameters(recurse=False)}

    def _partition_embedding_fn(self, name: str, module: nn.Module, device_mesh: DeviceMesh) -> None:
        if name:  # torch visits every submodule: the children stay replicated
            return
        for param_name, param in list(module.named_parameters(recurse=False)):
            sharded = distribute_tensor(param, device_mesh, [Shard(0)], src_data_rank=self.src_data_rank)
            module.register_parameter(param_name, nn.Parameter(sharded, requires_grad=param.requires_grad))

    @staticmethod
    def _reduce_lookup(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """A child's DTensor inputs (the partial lookup) all-reduced to ``Replicate``."""

        def full(value: Any) -> Any:
            return value.redistribute(placements=[Replicate()]) if isinstance(value, DTensor) else value

        return tuple(map(full, args)), {key: full(value) for key, value in kwargs.items()}

    def parallelize(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        for child in module.children():
            child.register_forward_pre_hook(self._reduce_lookup, with_kwargs=True)
        module.__class__ = _with_local_lookup(type(module))
        return self.torch_apply(module, device_mesh)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(use_local_output={self.use_local_output})"
