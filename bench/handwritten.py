"""The hand-written torch baseline shared by the benchmarks: the layout ``meshplan.parallelize`` builds for an
HF Llama, written with bare torch calls, and a comparable description of a parallelized model's layout."""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh

LLAMA_COLWISE = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
LLAMA_ROWWISE = ("self_attn.o_proj", "mlp.down_proj")


def llama_tp_plan() -> dict:
    """Column-wise q/k/v/gate/up, row-wise o/down, vocab-parallel embedding and ``lm_head``."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    plan = {f"model.layers.*.{name}": ColwiseParallel() for name in LLAMA_COLWISE}
    plan |= {f"model.layers.*.{name}": RowwiseParallel() for name in LLAMA_ROWWISE}
    plan["model.embed_tokens"] = RowwiseParallel(input_layouts=Replicate())
    plan["lm_head"] = ColwiseParallel(output_layouts=Replicate())
    return plan


def shard_llama_by_hand(model: torch.nn.Module, tp_mesh: DeviceMesh | None, dp_mesh: DeviceMesh,
                        block_policy, root_policy) -> torch.nn.Module:  # noqa: ANN001 - MixedPrecisionPolicy
    """TP with :func:`llama_tp_plan` (when ``tp_mesh`` is given), then ``fully_shard`` per layer (the last
    one not resharded after forward) and at the root (never resharded)."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import parallelize_module

    if tp_mesh is not None:
        parallelize_module(model, tp_mesh, llama_tp_plan())
    layers = model.model.layers
    for index, layer in enumerate(layers):
        fully_shard(layer, mesh=dp_mesh, mp_policy=block_policy, reshard_after_forward=index < len(layers) - 1)
    fully_shard(model, mesh=dp_mesh, mp_policy=root_policy, reshard_after_forward=False)
    return model


def layout_of(model: torch.nn.Module) -> dict[str, tuple]:
    """Per parameter: its placements and this rank's local shape."""
    from torch.distributed.tensor import DTensor

    return {name: (tuple(map(str, p.placements)) if isinstance(p, DTensor) else (),
                   tuple((p.to_local() if isinstance(p, DTensor) else p).shape))
            for name, p in model.named_parameters()}
