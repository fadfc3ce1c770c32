"""The Phi3-specific attention style (kept apart so plugin discovery does not import DTensor)."""

from __future__ import annotations

import copy

from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from ..tensor_parallel.styles.protocol import Style


class Phi3LocalHeads(Style):
    """Give a Phi3 attention module a shallow copy of its config with this rank's head counts (no comms)."""

    def parallelize(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        tp = device_mesh.size()
        config = copy.copy(module.config)
        config.num_attention_heads //= tp
        config.num_key_value_heads //= tp
        module.config = config
        module.num_key_value_heads //= tp
        return module

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
