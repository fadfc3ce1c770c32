"""Parity harness: train a tiny model in one process and on N gloo ranks, compare numbers.

``reference`` runs in the test process; ``distributed`` runs on every rank of a RankPool
(``pool.run(distributed, ModelSpec(...), {"dp": 2}, {"strategy": "fsdp2", ...})``). Both see the
same initial weights (same seed) and the same global batches; each data-parallel rank trains on its
slice of the global batch, so the averaged loss and the final parameters must match the reference.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from tests.support import full_grads, full_params, relative_error, tiny_hf


@dataclass(frozen=True)
class ModelSpec:
    """A picklable recipe for a tiny HF model (see ``tests.support.tiny_hf``)."""

    model_type: str = "llama"
    seed: int = 0
    overrides: dict[str, Any] = field(default_factory=dict)

    def build(self) -> nn.Module:
        return tiny_hf(self.model_type, seed=self.seed, **self.overrides)


@dataclass
class RunResult:
    losses: list[float]
    params: dict[str, torch.Tensor]
    grads: dict[str, torch.Tensor] = field(default_factory=dict)  # first step's, when captured


def batches(vocab_size: int, steps: int, global_batch: int = 4, seq_len: int = 16, seed: int = 1234):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (global_batch, seq_len), generator=generator) for _ in range(steps)]


OPTIMIZERS = {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}


def _train(model: nn.Module, data: list[torch.Tensor], lr: float, reduce_loss=None,
           grads_out: dict | None = None, optimizer: str = "adamw") -> list[float]:
    optimizer = OPTIMIZERS[optimizer](model.parameters(), lr=lr)
    losses = []
    for step, input_ids in enumerate(data):
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        if grads_out is not None and step == 0:
            grads_out.update(full_grads(model))
        optimizer.step()
        optimizer.zero_grad()
        value = loss.detach().float()
        losses.append(float(reduce_loss(value) if reduce_loss else value))
    return losses


def reference(spec: ModelSpec, steps: int = 3, lr: float = 1e-3, global_batch: int = 4,
              capture_grads: bool = False, optimizer: str = "adamw") -> RunResult:
    model = spec.build()
    data = batches(model.config.get_text_config().vocab_size, steps, global_batch)
    grads: dict[str, torch.Tensor] = {}
    losses = _train(model, data, lr, grads_out=grads if capture_grads else None, optimizer=optimizer)
    return RunResult(losses, full_params(model), grads)


def data_parallel_index(mesh, tp_names: tuple[str, ...] = ("tp",)) -> tuple[int, int]:
    """(index, size) of this rank along the mesh dims that are not tensor parallel."""
    index, size = 0, 1
    for name, dim, coord in zip(mesh.mesh_dim_names, mesh.shape, mesh.get_coordinate()):
        if name not in tp_names:
            index, size = index * dim + coord, size * dim
    return index, size


def _mean_over_world(value: torch.Tensor) -> torch.Tensor:
    value = value.clone()
    dist.all_reduce(value)
    return value / dist.get_world_size()


def distributed(
    spec: ModelSpec, mesh_shape: dict[str, int], parallelize_kwargs: dict[str, Any], steps: int = 3,
    lr: float = 1e-3, global_batch: int = 4, capture_grads: bool = False, optimizer: str = "adamw",
) -> RunResult:
    """Runs on every rank: parallelize with meshplan, train on this rank's data slice, gather params."""
    from torch.distributed.device_mesh import init_device_mesh

    import meshplan

    mesh = init_device_mesh("cpu", tuple(mesh_shape.values()), mesh_dim_names=tuple(mesh_shape))
    model = meshplan.parallelize(spec.build(), mesh, **parallelize_kwargs)
    dp_index, dp_size = data_parallel_index(mesh, (parallelize_kwargs.get("tp_mesh_name", "tp"),))
    per_rank = global_batch // dp_size
    data = [b[dp_index * per_rank:(dp_index + 1) * per_rank]
            for b in batches(model.config.get_text_config().vocab_size, steps, global_batch)]
    grads: dict[str, torch.Tensor] = {}
    losses = _train(model, data, lr, reduce_loss=_mean_over_world, grads_out=grads if capture_grads else None,
                    optimizer=optimizer)
    return RunResult(losses, full_params(model), grads)


def max_relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| relative to the largest |expected| (at least 1e-12)."""
    return relative_error(actual, expected, floor=1e-12)


def assert_parity(result: RunResult, expected: RunResult, rtol: float = 1e-5) -> None:
    """Loss of every step and every final parameter within ``rtol`` (relative to the tensor's max)."""
    for step, (got, want) in enumerate(zip(result.losses, expected.losses)):
        assert abs(got - want) <= rtol * abs(want), f"step {step}: loss {got} vs reference {want}"
    assert result.params.keys() == expected.params.keys()
    worst = max(expected.params, key=lambda n: max_relative_error(result.params[n], expected.params[n]))
    error = max_relative_error(result.params[worst], expected.params[worst])
    assert error <= rtol, f"parameter {worst}: relative error {error:.3g} > {rtol}"


def assert_grad_parity(result: RunResult, expected: RunResult, rtol: float = 1e-5) -> None:
    """First-step gradients within ``rtol`` (relative to each tensor's max); catches scaling errors that
    Adam's normalized update would hide from the parameters."""
    assert result.grads and result.grads.keys() == expected.grads.keys(), "gradients were not captured"
    worst = max(expected.grads, key=lambda n: max_relative_error(result.grads[n], expected.grads[n]))
    error = max_relative_error(result.grads[worst], expected.grads[worst])
    assert error <= rtol, f"gradient of {worst}: relative error {error:.3g} > {rtol}"
