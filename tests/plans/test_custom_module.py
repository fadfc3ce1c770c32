"""A plan registered at runtime for a plain ``nn.Module`` (not from transformers) is found and applied."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.distributed.tensor import DTensor

from tests.support import TensorParallelOnly, TinyStack, relative_error, tp_mesh

pytestmark = pytest.mark.distributed


def _runtime_plan_for_custom_module() -> dict:
    import meshplan

    meshplan.register_strategy(TensorParallelOnly)
    meshplan.register_tp_plan(TinyStack, {"layers.*.up": "colwise", "layers.*.down": "rowwise"})
    torch.manual_seed(0)
    reference = TinyStack(dim=16, depth=2)
    model = meshplan.parallelize(copy.deepcopy(reference), tp_mesh(), strategy="tp_test")
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(1))
    expected, actual = reference(x), model(x)
    expected.square().sum().backward()
    actual.square().sum().backward()
    grads = {n: p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad for n, p in model.named_parameters()}
    return {
        "source": meshplan.get_report(model)["plan"]["source"],
        "sharded": isinstance(model.layers[0].up.weight, DTensor),
        "output": relative_error(actual.detach(), expected.detach()),
        "grads": max(relative_error(grads[n], p.grad) for n, p in reference.named_parameters()),
    }


def test_runtime_registered_plan_for_a_custom_module(ranks2):
    for result in ranks2.run(_runtime_plan_for_custom_module, timeout=120):
        assert "TinyStack" in result["source"] and "runtime" in result["source"]
        assert result["sharded"]
        assert result["output"] <= 1e-5 and result["grads"] <= 1e-5, result


class _Fused(torch.nn.Module):
    """``down(silu(gate) * up)`` with gate and up fused in one Linear, down consuming a fused input too."""

    def __init__(self) -> None:
        super().__init__()
        self.gate_up = torch.nn.Linear(8, 12)
        self.down = torch.nn.Linear(12, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, -1)
        return self.down(torch.cat([torch.nn.functional.silu(gate), up], -1))


class _RankScaled(torch.nn.Module):
    """Output differs per rank: a partial sum whose total is ``x * (1 + 2)`` on two ranks."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (torch.distributed.get_rank() + 1)


def _packed_and_all_reduce_styles() -> dict:
    import meshplan
    from meshplan.state.packing import unpack_full_state_dict

    meshplan.register_strategy(TensorParallelOnly)
    torch.manual_seed(0)
    reference = _Fused()
    plan = {"gate_up": "packed_colwise", "down": "packed_rowwise"}
    model = meshplan.parallelize(copy.deepcopy(reference), tp_mesh(), strategy="tp_test", tp_plan=plan)
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    expected, actual = reference(x), model(x)
    expected.square().sum().backward()
    actual.square().sum().backward()
    grads = unpack_full_state_dict(model, {n: p.grad.full_tensor() for n, p in model.named_parameters()})
    weights = unpack_full_state_dict(model, {n: p.full_tensor() for n, p in model.named_parameters()})
    summed = meshplan.parallelize(_RankScaled(), tp_mesh(), strategy="tp_test", tp_plan={"": "all_reduce"})(x)
    return {
        "output": relative_error(actual.detach(), expected.detach()),
        "grads": max(relative_error(grads[n], p.grad) for n, p in reference.named_parameters()),
        "weights": all(torch.equal(weights[n], p.detach()) for n, p in reference.named_parameters()),
        "all_reduce": relative_error(summed, 3 * x),
    }


def test_packed_styles_and_all_reduce(ranks2):
    for result in ranks2.run(_packed_and_all_reduce_styles, timeout=120):
        assert result["output"] <= 1e-5 and result["grads"] <= 1e-5, result
        assert result["weights"], "unpack_full_state_dict must restore the original weights"
        assert result["all_reduce"] <= 1e-6, result
