"""Token dispatch for expert parallelism: send each (token, expert) pair to the rank that owns the expert.

The experts are split by expert over the EP group: rank ``r`` of ``ep`` ranks owns the contiguous global ids
``[r * local, (r + 1) * local)``. One MoE layer is

1. :func:`dispatch`: sort the (token, top-k slot) pairs by expert (so by owner rank), exchange the per-expert
   counts (one small all-to-all, the only host sync), then the token rows themselves (an autograd-aware
   all-to-all with uneven splits, works on gloo and NCCL);
2. the owner runs its experts on the rows it received (:attr:`Dispatched.local_expert_ids` says which);
3. :func:`combine`: the outputs go back by the reverse all-to-all, are put back in (token, slot) order and
   summed per token with the routing weights.

Gradients reach every rank that routed a token, routing weights included, because both exchanges are
differentiable (the backward of an all-to-all is the reverse all-to-all).

When the ranks of a *token group* hold the same tokens (the EP group borrowed TP ranks, which share their
batch), each of them dispatches a disjoint slice of the tokens (:func:`split_tokens`) and the outputs are
gathered back (:func:`gather_tokens`), so no token is computed twice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh


def all_to_all(tensor: torch.Tensor, output_sizes: list[int], input_sizes: list[int],
               group: dist.ProcessGroup) -> torch.Tensor:
    """Differentiable ``all_to_all_single`` along dim 0 with uneven (possibly empty) splits; waits for the result."""
    from ..core.torch_private import AsyncCollectiveTensor, all_to_all_single_autograd  # heavy: on first use

    result = all_to_all_single_autograd(tensor.contiguous(), output_sizes, input_sizes, group)
    return result.wait() if isinstance(result, AsyncCollectiveTensor) else result


@dataclass(frozen=True)
class Dispatched:
    """The rows one rank's experts must run on, and what :func:`combine` needs to bring the results back.

    ``tokens[i]`` is for local expert ``local_expert_ids[i]``; rows arrive grouped by source rank, then by
    expert. ``counts`` is ``[ep, local experts]``: how many rows each source rank sent to each local expert.
    """

    tokens: torch.Tensor
    local_expert_ids: torch.Tensor
    counts: torch.Tensor
    order: torch.Tensor
    top_k_weights: torch.Tensor
    send_sizes: list[int]
    recv_sizes: list[int]


def dispatch(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
             num_local_experts: int, group: dist.ProcessGroup) -> Dispatched:
    """Send every (token, expert) pair of this rank's ``[tokens, hidden]`` batch to the expert's owner.

    ``top_k_index`` holds global expert ids ``[tokens, k]``; ``top_k_weights`` stays here for :func:`combine`.
    """
    ep_size = dist.get_world_size(group)
    top_k = top_k_index.size(-1)
    expert_ids = top_k_index.reshape(-1)
    order = torch.argsort(expert_ids, stable=True)
    send_tokens = hidden_states[order // top_k]
    send_counts = torch.bincount(expert_ids, minlength=num_local_experts * ep_size).view(ep_size, num_local_experts)
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=group)
    send_sizes, recv_sizes = torch.stack([send_counts.sum(dim=1), recv_counts.sum(dim=1)]).tolist()
    tokens = all_to_all(send_tokens, recv_sizes, send_sizes, group)
    local_ids = torch.arange(num_local_experts, device=hidden_states.device).repeat(ep_size)
    local_ids = local_ids.repeat_interleave(recv_counts.reshape(-1), output_size=tokens.size(0))
    return Dispatched(tokens, local_ids, recv_counts, order, top_k_weights, send_sizes, recv_sizes)


def combine(expert_output: torch.Tensor, state: Dispatched, group: dist.ProcessGroup) -> torch.Tensor:
    """The expert outputs back to their senders, in (token, slot) order, summed per token with the weights."""
    returned = all_to_all(expert_output, state.send_sizes, state.recv_sizes, group)
    inverse = torch.empty_like(state.order)
    inverse[state.order] = torch.arange(state.order.numel(), device=state.order.device)
    per_slot = returned[inverse].view(*state.top_k_weights.shape, returned.size(-1))
    weighted = per_slot * state.top_k_weights.unsqueeze(-1)
    return weighted.sum(dim=1).to(expert_output.dtype)


def split_tokens(tensors: tuple[torch.Tensor, ...], mesh: DeviceMesh) -> tuple[torch.Tensor, ...]:
    """This rank's slice (``torch.chunk`` of dim 0) of tensors every rank of ``mesh`` holds whole; the backward
    all-gathers the slices' gradients, so each rank gets the gradient of the whole tensor."""
    from torch.distributed.tensor import DTensor, Replicate, Shard  # loaded on use: keeps start-up light

    return tuple(DTensor.from_local(t, mesh, [Replicate()], run_check=False).redistribute(mesh, [Shard(0)])
                 .to_local() for t in tensors)


def gather_tokens(local: torch.Tensor, num_tokens: int, mesh: DeviceMesh) -> torch.Tensor:
    """Concatenate the slices :func:`split_tokens` produced (uneven or empty ones too) on every rank of ``mesh``."""
    from torch.distributed.tensor import DTensor, Shard  # loaded on use: keeps start-up light

    shape = (num_tokens, *local.shape[1:])
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local.contiguous(), mesh, [Shard(0)], shape=shape, stride=stride).full_tensor()
