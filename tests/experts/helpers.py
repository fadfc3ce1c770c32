"""Rank-side checks for the MoE tests: a parallelized tiny MoE model against the same model in one process.

Every rank builds the reference itself (same seed, same weights; :func:`tests.plans.helpers.build`), so only small
numbers travel back to the test process.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from meshplan.experts.modules import find_expert_modules
from tests.plans.helpers import _full_grads, _full_params, build, relative_error


def _inputs(step: int, vocab_size: int = 250) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(0, vocab_size, (2, 16), generator=generator)
    return {"input_ids": ids, "labels": torch.randint(0, vocab_size, (2, 16), generator=generator)}


def _count_routing(model: nn.Module) -> list[torch.Tensor]:
    """Installs hooks that add the tokens routed to each expert of every experts module into the returned
    counters (one per module)."""
    counters = []
    for _, module in find_expert_modules(model):
        counts = torch.zeros(module.num_experts, dtype=torch.long)

        def count(mod: nn.Module, args: tuple, counts: torch.Tensor = counts) -> None:
            counts.add_(torch.bincount(args[1].flatten(), minlength=mod.num_experts))

        module.register_forward_pre_hook(count)
        counters.append(counts)
    return counters


def _worst(errors: dict[str, float]) -> tuple[float, str]:
    name = max(errors, key=errors.get)
    return errors[name], name


def sgd_parity(name: str, mesh_shape: dict[str, int], options: dict[str, Any], steps: int = 3,
               lr: float = 0.2) -> dict[str, Any]:
    """Runs on every rank: ``steps`` SGD steps of ``name`` parallelized by meshplan (fp32) and in one process on
    the same data; the worst relative errors of the losses, of every gathered gradient (each step) and of every
    gathered parameter (after each step), each relative to the tensor's largest value."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy

    import meshplan

    reference = build(name)
    model = copy.deepcopy(reference)
    counters = _count_routing(reference)
    mesh = init_device_mesh("cpu", tuple(mesh_shape.values()), mesh_dim_names=tuple(mesh_shape))
    meshplan.parallelize(model, mesh, mp_policy=MixedPrecisionPolicy(), **options)
    optimizers = [torch.optim.SGD(m.parameters(), lr=lr) for m in (reference, model)]
    loss_error, grad_error, param_error = 0.0, (0.0, ""), (0.0, "")
    for step in range(steps):
        inputs = _inputs(step)
        ref_loss, loss = (m(**inputs).loss for m in (reference, model))
        for value in (ref_loss, loss):
            value.backward()
        loss_error = max(loss_error, abs(loss.item() - ref_loss.item()) / abs(ref_loss.item()))
        ref_grads = {n: p.grad for n, p in reference.named_parameters()}
        grads = _full_grads(model)
        if grads.keys() != ref_grads.keys():
            raise AssertionError(f"parameters with gradients differ: {sorted(grads.keys() ^ ref_grads.keys())}")
        grad_error = max(grad_error, _worst({n: relative_error(grads[n], ref_grads[n]) for n in ref_grads}))
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
        params, ref_params = _full_params(model), dict(reference.named_parameters())
        param_error = max(param_error, _worst({n: relative_error(params[n], ref_params[n].detach())
                                               for n in ref_params}))
    return {"loss": loss_error, "grad": grad_error, "param": param_error,
            "tokens_per_expert": [c.tolist() for c in counters],
            "source": meshplan.get_report(model)["plan"]["source"]}


def sgd_parity_cases(cases: list[tuple[str, dict[str, int], dict[str, Any]]]) -> list[dict[str, Any] | str]:
    """:func:`sgd_parity` for each ``(name, mesh, options)``; an error becomes its message, so one failing case
    does not hide the others."""
    results: list[dict[str, Any] | str] = []
    for case in cases:
        try:
            results.append(sgd_parity(*case))
        except Exception as exc:  # noqa: BLE001 - reported per case
            results.append(f"{type(exc).__name__}: {exc}")
    return results
