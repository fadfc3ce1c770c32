"""The ``ddp`` strategy: parity with one process (dp=2, dp=2 x tp=2), option mapping, validation.

Parity runs train the tiny HF Llama for 3 AdamW steps in fp32; losses, first-step gradients and final
parameters must match one process within 1e-5 (relative to each tensor's largest value). The learning
rate is 1e-4: with AdamW, TP's different fp32 summation order alone (tp=2, no data parallelism) moves
single weights by 2e-5 relative after 3 steps at lr 1e-3, because Adam normalizes near-zero gradients;
that error scales with lr (2e-6 at 1e-4, with or without dp=2). Gradients are compared directly too.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh

import meshplan
from meshplan import MeshError, UnsupportedAxisError, UnsupportedConfigurationError
from meshplan.strategies.ddp import DDPOptions, ddp_kwargs
from tests.parity import ModelSpec, RunResult, assert_grad_parity, assert_parity, distributed, reference
from tests.support import TinyStack

LR = 1e-4
LLAMA = ModelSpec()

#: TP plan for the TinyStack unit tests (the Llama parity test uses the built-in Llama provider).
STACK_PLAN = {"layers.*.up": "colwise", "layers.*.down": "rowwise"}


@functools.cache
def _reference() -> RunResult:
    return reference(LLAMA, lr=LR, capture_grads=True)


def _check(pool, mesh: dict[str, int], **kwargs) -> None:
    results = pool.run(distributed, LLAMA, mesh, {"strategy": "ddp", **kwargs}, lr=LR, capture_grads=True)
    assert_parity(results[0], _reference(), rtol=1e-5)
    assert_grad_parity(results[0], _reference(), rtol=1e-5)
    _assert_replicas_equal(results)


def _assert_replicas_equal(results) -> None:
    """Every rank ends with the same full parameters (the data-parallel replicas stayed in sync)."""
    for other in results[1:]:
        for name, value in results[0].params.items():
            torch.testing.assert_close(other.params[name], value, rtol=0, atol=0)


@pytest.mark.distributed
def test_ddp_dp2_matches_one_process_with_activation_checkpointing(ranks2):
    _check(ranks2, {"dp": 2}, activation_checkpointing="full")


@pytest.mark.distributed
def test_ddp_dp2_x_tp2_matches_one_process(ranks4):
    _check(ranks4, {"dp": 2, "tp": 2})  # TP plan: the built-in Llama provider (meshplan/plans/llama.py)


class WithUnused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(4, 4)
        self.unused = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.used(x)


def _train_with_unused(**options) -> list[float]:
    import torch.distributed as dist

    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("dp",))
    torch.manual_seed(0)
    model = meshplan.parallelize(WithUnused(), mesh, strategy="ddp", **options)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(2):
        model(torch.full((2, 4), float(dist.get_rank() + step))).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.used.weight.detach().flatten().tolist()


@pytest.mark.distributed
def test_find_unused_parameters_reaches_ddp(ranks2):
    with pytest.raises(Exception, match="find_unused_parameters"):
        ranks2.run(_train_with_unused)
    first, second = ranks2.run(_train_with_unused, find_unused_parameters=True)
    assert first == second


def test_ddp_kwargs_forward_only_what_is_asked():
    assert ddp_kwargs(DDPOptions()) == {"find_unused_parameters": False, "static_graph": False}
    options = DDPOptions(bucket_cap_mb=50.0, find_unused_parameters=True, static_graph=True)
    assert ddp_kwargs(options) == {"bucket_cap_mb": 50.0, "find_unused_parameters": True, "static_graph": True}


@pytest.mark.parametrize("option", [{"bucket_cap_mb": 10.0}, {"static_graph": True}])
def test_bucket_and_static_graph_rejected_with_tp_before_any_work(fake_pg, option):
    plan = STACK_PLAN
    model = TinyStack()
    with fake_pg(4):
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        with pytest.raises(UnsupportedConfigurationError, match="FSDP2-based replicate"):
            meshplan.parallelize(model, mesh, strategy="ddp", tp_plan=plan, **option)
    assert not any(isinstance(p, torch.distributed.tensor.DTensor) for p in model.parameters())


def test_mesh_dims_must_all_be_dp_or_tp(fake_pg):
    plan = STACK_PLAN
    with fake_pg(8):
        mesh = init_device_mesh("cpu", (2, 2, 2), mesh_dim_names=("dp", "cp", "tp"))
        with pytest.raises(UnsupportedAxisError, match=r"'ddp' does not support context parallelism \('cp'\), asked "
                           r"for by mesh dim 'cp' of size 2: it supports \['tp'\]"):
            meshplan.parallelize(TinyStack(), mesh, strategy="ddp", tp_plan=plan)
        mesh = init_device_mesh("cpu", (2, 2, 2), mesh_dim_names=("dp", "seq", "tp"))
        with pytest.raises(MeshError, match=r"Mesh dim 'seq' \(size 2\) has no role in strategy 'ddp'"):
            meshplan.parallelize(TinyStack(), mesh, strategy="ddp", tp_plan=plan)
        with pytest.raises(MeshError, match=r"dp_replicate: \['data', 'dp_replicate\+dp_shard'\]"):
            meshplan.parallelize(TinyStack(), mesh, strategy="ddp", tp_plan=plan, dp_mesh_name="data")


def test_bad_activation_checkpointing_mode_and_bucket_size(fake_pg):
    with fake_pg(2):
        mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("dp",))
        with pytest.raises(UnsupportedConfigurationError, match="activation_checkpointing must be one of"):
            meshplan.parallelize(TinyStack(), mesh, strategy="ddp", activation_checkpointing="everything")
        with pytest.raises(UnsupportedConfigurationError, match="bucket_cap_mb must be a positive number"):
            meshplan.parallelize(TinyStack(), mesh, strategy="ddp", bucket_cap_mb=0)


def test_listed_with_options_and_available():
    row = next(r for r in meshplan.list_strategies() if r["name"] == "ddp")
    assert row["unavailable_reason"] is None
    options = {o["name"]: o["default"] for o in row["options"]}
    assert options["bucket_cap_mb"] == "None" and options["activation_checkpointing"] == "False"
    assert {"find_unused_parameters", "static_graph", "dp_mesh_name", "activation_checkpointing_every"} <= set(options)
