"""Expert-parallel token dispatch on 2 gloo ranks vs the same experts module in one process.

A tiny Mixtral experts module (8 experts, top-2) gets random routes with uneven tokens per expert; under
``ExpertParallel`` each rank keeps 4 experts. Outputs, input and routing-weight gradients and the gathered
expert-parameter gradients must match the whole module run on the global batch (fp32, 1e-5 relative).
"""

from __future__ import annotations

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from tests.support import relative_error

TOKENS, HIDDEN, EXPERTS, TOP_K = 12, 16, 8, 2


def _experts() -> torch.nn.Module:
    from transformers import AutoConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    config = AutoConfig.for_model("mixtral", hidden_size=HIDDEN, intermediate_size=24, num_local_experts=EXPERTS,
                                  num_experts_per_tok=TOP_K)
    torch.manual_seed(0)
    module = MixtralExperts(config)
    for param in module.parameters():
        torch.nn.init.normal_(param, std=0.2)
    return module


def _inputs(routing: str) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(TOKENS, HIDDEN, generator=generator)
    if routing == "to-rank-0":  # rank 1's experts (4..7) receive nothing
        index = torch.stack([torch.randperm(4, generator=generator)[:TOP_K] for _ in range(TOKENS)])
    else:  # skewed: experts 0 and 5 are popular, some experts get no tokens
        logits = torch.randn(TOKENS, EXPERTS, generator=generator) + torch.tensor([3.0, 0, 0, 0, 0, 2.0, 0, 0])
        index = logits.topk(TOP_K, dim=-1).indices
    weights = torch.rand(TOKENS, TOP_K, generator=generator)
    target = torch.randn(TOKENS, HIDDEN, generator=generator)
    return hidden, index, weights, target


def _run(module, hidden, index, weights, target):
    hidden, weights = hidden.clone().requires_grad_(), weights.clone().requires_grad_()
    output = module(hidden, index, weights)
    (output * target).sum().backward()
    grads = {name: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad)
             for name, p in module.named_parameters()}
    return output.detach(), hidden.grad, weights.grad, grads


def compare_on_ranks(routing: str, shared_tokens: bool) -> dict[str, float]:
    """Runs on every rank: whole module on the global batch vs ExpertParallel on this rank's share."""
    import torch.distributed as dist

    from meshplan.experts.expert_parallel import ExpertParallel

    hidden, index, weights, target = _inputs(routing)
    expected = _run(_experts(), hidden, index, weights, target)
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("ep",))
    rank = dist.get_rank()
    rows = slice(None) if shared_tokens else slice(rank * TOKENS // 2, (rank + 1) * TOKENS // 2)
    module = ExpertParallel(token_mesh=mesh if shared_tokens else None)._apply(_experts(), mesh)
    local_shapes = {name: tuple(p.to_local().shape) for name, p in module.named_parameters()}
    got = _run(module, hidden[rows], index[rows], weights[rows], target[rows])
    errors = {"output": relative_error(got[0], expected[0][rows]),
              "hidden.grad": relative_error(got[1], expected[1][rows]),
              "weights.grad": relative_error(got[2], expected[2][rows])}
    errors.update({f"{name}.grad": relative_error(got[3][name], expected[3][name]) for name in expected[3]})
    return {"errors": errors, "local_shapes": local_shapes}


@pytest.mark.distributed
@pytest.mark.parametrize("routing", ["skewed", "to-rank-0"])
@pytest.mark.parametrize("shared_tokens", [False, True], ids=["own-tokens", "shared-tokens"])
def test_expert_parallel_matches_one_process(ranks2, routing, shared_tokens):
    results = ranks2.run(compare_on_ranks, routing, shared_tokens, timeout=120)
    for rank, result in enumerate(results):
        assert result["local_shapes"] == {"gate_up_proj": (4, 48, HIDDEN), "down_proj": (4, HIDDEN, 24)}
        worst = max(result["errors"], key=result["errors"].get)
        assert result["errors"][worst] <= 1e-5, (rank, worst, result["errors"])
