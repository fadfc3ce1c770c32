"""Vocab-parallel embedding (``embedding_rowwise``), also for an embedding whose forward applies child modules."""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import RowwiseParallel

from .protocol import ParamSplit, Placements, Style


class VocabParallelEmbedding(Style, RowwiseParallel):
    """Vocab-parallel ``nn.Embedding`` (``embedding_rowwise``): the weight is sharded along the vocabulary
    (``Shard(0)``), the replicated input ids look up this rank's rows and the lookup is all-reduced.

    Unlike torch's ``RowwiseParallel`` it also takes an ``nn.Embedding`` subclass whose forward passes the lookup
    through child modules (Inkling's embedding + RMSNorm): only the module's own parameters are sharded, and the
    lookup is all-reduced before a child sees it, so the children (whose parameters torch makes replicated DTensors)
    run replicated on the full embedding. Without children it is torch's vocab-parallel embedding."""

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
        return self.torch_apply(module, device_mesh)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(use_local_output={self.use_local_output})"
