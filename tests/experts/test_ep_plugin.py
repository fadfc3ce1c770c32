"""A third party's own MoE class gets expert parallelism from an EP plan it registers at runtime.

``TinyMoEModel`` is not a transformers model: its experts module has its own parameter names and forward (the
transformers call signature). Its plan provider returns ``{"ep": {...}}`` only, through the same
``register_tp_plan`` registry and MRO lookup as TP plans. Trained 3 SGD steps on 2 gloo ranks with ep=2, it must
match one process (losses, gathered gradients and parameters within 1e-5 relative).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.support import full_grads, full_params, relative_error

DIM, EXPERTS, TOP_K, TOKENS = 8, 4, 2, 16


class TinyExperts(nn.Module):
    """Fused experts ``[num_experts, ...]`` called as ``(hidden_states, top_k_index, top_k_weights)``."""

    def __init__(self) -> None:
        super().__init__()
        self.num_experts = EXPERTS
        self.w_in = nn.Parameter(torch.randn(EXPERTS, 2 * DIM, DIM) * 0.3)
        self.w_out = nn.Parameter(torch.randn(EXPERTS, DIM, 2 * DIM) * 0.3)

    def forward(self, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        for expert in range(self.num_experts):
            token, slot = torch.where(index == expert)
            if token.numel():
                y = torch.relu(x[token] @ self.w_in[expert].T) @ self.w_out[expert].T
                out = out.index_add(0, token, y * weights[token, slot, None])
        return out


class TinyMoE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.router = nn.Linear(DIM, EXPERTS, bias=False)
        self.experts = TinyExperts()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, DIM)
        weights, index = torch.softmax(self.router(flat), dim=-1).topk(TOP_K, dim=-1)
        return x + self.experts(flat, index, weights).view_as(x)


class TinyMoEModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(TinyMoE() for _ in range(2))
        self.head = nn.Linear(DIM, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def _train(model: nn.Module, rows: slice, steps: int = 3) -> tuple[list[float], dict, dict]:
    generator = torch.Generator().manual_seed(7)
    data = [(torch.randn(TOKENS, 1, DIM, generator=generator), torch.randn(TOKENS, 1, 1, generator=generator))
            for _ in range(steps)]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    losses, grads = [], {}
    for step, (x, y) in enumerate(data):
        loss = ((model(x[rows]) - y[rows]) ** 2).mean()
        loss.backward()
        if step == 0:
            grads = full_grads(model)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach())
    return losses, grads, full_params(model)


def train_with_registered_plan() -> dict[str, float]:
    """Runs on every rank: register the EP plan, parallelize with ep=2, compare with one process."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy

    import meshplan

    expected_losses, expected_grads, expected_params = _train(TinyMoEModel(), slice(None))
    meshplan.register_tp_plan(TinyMoEModel, {"ep": {"layers.*.experts": "ep_dispatch_experts"}})
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("dp_shard",))
    model = meshplan.parallelize(TinyMoEModel(), mesh, ep_size=2, mp_policy=MixedPrecisionPolicy())
    local = model.layers[0].experts.w_in.to_local().shape[0]
    rank = dist.get_rank()
    losses, grads, params = _train(model, slice(rank * TOKENS // 2, (rank + 1) * TOKENS // 2))
    for loss in losses:
        dist.all_reduce(loss)
    errors = {f"loss {i}": abs(float(got) / 2 - float(want)) / abs(float(want))
              for i, (got, want) in enumerate(zip(losses, expected_losses))}
    errors.update({f"grad {n}": relative_error(grads[n], expected_grads[n]) for n in expected_grads})
    errors.update({f"param {n}": relative_error(params[n], expected_params[n]) for n in expected_params})
    return {"errors": errors, "local_experts": local, "source": model._meshplan_report["ep_plan"]["source"]}


@pytest.mark.distributed
def test_runtime_registered_ep_plan_for_a_custom_moe(ranks2):
    for result in ranks2.run(train_with_registered_plan, timeout=120):
        assert result["local_experts"] == 2  # 4 experts over ep=2; FSDP over 1 rank keeps both
        assert "TinyMoEModel" in result["source"]
        worst = max(result["errors"], key=result["errors"].get)
        assert result["errors"][worst] <= 1e-5, (worst, result["errors"])
