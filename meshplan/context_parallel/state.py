"""Per-model context-parallel state (fixed when CP is applied), found from the attention module the attention
function is called with."""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from ..core.errors import ContextParallelError
from . import sequence_layout as layout

#: ``cp_implementation`` values: all-gather K/V (any attention, any device), torch's ring attention (CUDA SDPA),
#: or ``external``: the training loop runs CP itself (torch's ``context_parallel`` context manager, as NeMo
#: AutoModel and torchtitan loops do) and the model is left as it is.
IMPLEMENTATIONS: tuple[str, ...] = ("allgather", "ring", "external")


@dataclass
class ContextParallelState:
    """What the CP attention of one model needs whatever the batch: the CP group and how to call the wrapped
    attention (what a forward adds is in :class:`~meshplan.context_parallel.forward.ForwardContext`)."""

    mesh: DeviceMesh
    implementation: str
    inner: str  # the attention implementation the model used before CP ("eager", "sdpa", ...)
    _indices: dict = field(default_factory=dict, repr=False)

    @property
    def group(self) -> dist.ProcessGroup:
        return self.mesh.get_group()

    @property
    def size(self) -> int:
        return self.mesh.size()

    @property
    def rank(self) -> int:
        return self.mesh.get_local_rank()

    def indices(self, local_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(original positions of the local tokens, the permutation taking gathered order to original order)."""
        key = (local_len, str(device))
        if key not in self._indices:
            seq_len = local_len * self.size
            self._indices[key] = (layout.shard_indices(seq_len, self.rank, self.size, device),
                                  layout.restore_order(seq_len, self.size, device))
        return self._indices[key]


_STATES: weakref.WeakKeyDictionary[nn.Module, ContextParallelState] = weakref.WeakKeyDictionary()


def bind(model: nn.Module, state: ContextParallelState) -> None:
    """Make ``state`` the CP state of every submodule of ``model`` (attention modules look it up)."""
    for module in model.modules():
        _STATES[module] = state


def state_of(module: nn.Module) -> ContextParallelState:
    """The CP state of an attention module, or a :class:`ContextParallelError` when CP was not applied."""
    state = _STATES.get(module)
    if state is None:
        raise ContextParallelError(
            f"{type(module).__name__} runs the context-parallel attention but its model was not prepared for it. "
            "Use meshplan.parallelize with a 'cp' mesh dim (or meshplan.context_parallel.apply_context_parallel).")
    return state
