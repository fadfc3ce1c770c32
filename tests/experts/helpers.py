"""Rank-side checks for the MoE tests: a parallelized tiny MoE model against the same model in one process.

Every rank builds the reference itself (same seed, same weights; :func:`tests.plans.helpers.build`), so only small
numbers travel back to the test process.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from meshplan.introspection.experts import find_expert_modules
from tests.plans.helpers import build
from tests.support import full_grads, full_params, relative_error


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


def sgd_parity(name: str, mesh_shape: dict[str, int], options: dict[str, Any], overrides: dict[str, Any] | None = None,
               steps: int = 3, lr: float = 0.2, compile_backend: str | None = None) -> dict[str, Any]:
    """Runs on every rank: ``steps`` SGD steps of ``name`` (config ``overrides``) parallelized by meshplan (fp32;
    with ``compile_backend``, then ``torch.compile`` of the whole model with that backend) and in one process, every
    rank on the same data (data-parallel ranks average identical gradients); the worst relative errors of the losses,
    of every gathered gradient (each step) and of every gathered parameter (after each step), each relative to the
    tensor's largest value."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy

    import meshplan

    reference = build(name, **(overrides or {}))
    model = copy.deepcopy(reference)
    counters = _count_routing(reference)
    mesh = init_device_mesh("cpu", tuple(mesh_shape.values()), mesh_dim_names=tuple(mesh_shape))
    meshplan.parallelize(model, mesh, mp_policy=MixedPrecisionPolicy(), **options)
    optimizers = [torch.optim.SGD(m.parameters(), lr=lr) for m in (reference, model)]
    forward = torch.compile(model, backend=compile_backend) if compile_backend else model
    loss_error, grad_error, param_error = 0.0, (0.0, ""), (0.0, "")
    for step in range(steps):
        inputs = _inputs(step)
        ref_loss, loss = (m(**inputs).loss for m in (reference, forward))
        for value in (ref_loss, loss):
            value.backward()
        loss_error = max(loss_error, abs(loss.item() - ref_loss.item()) / abs(ref_loss.item()))
        ref_grads = {n: p.grad for n, p in reference.named_parameters()}
        grads = full_grads(model)  # keyed without checkpoint wrappers
        if grads.keys() != ref_grads.keys():
            raise AssertionError(f"parameters with gradients differ: {sorted(grads.keys() ^ ref_grads.keys())}")
        grad_error = max(grad_error, _worst({n: relative_error(grads[n], ref_grads[n]) for n in ref_grads}))
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
        params = full_params(model)
        ref_params = dict(reference.named_parameters())
        param_error = max(param_error, _worst({n: relative_error(params[n], ref_params[n].detach())
                                               for n in ref_params}))
    return {"loss": loss_error, "grad": grad_error, "param": param_error,
            "tokens_per_expert": [c.tolist() for c in counters],
            "source": (meshplan.get_report(model)["plan"] or {}).get("source")}


def sgd_parity_cases(cases: list[tuple[str, dict[str, int], dict[str, Any], dict[str, Any]]]
                     ) -> list[dict[str, Any] | str]:
    """:func:`sgd_parity` for each ``(name, mesh, options, config overrides)``; an error becomes its message, so
    one failing case does not hide the others."""
    results: list[dict[str, Any] | str] = []
    for case in cases:
        try:
            results.append(sgd_parity(*case))
        except Exception as exc:  # noqa: BLE001 - reported per case
            results.append(f"{type(exc).__name__}: {exc}")
    return results


def experts_module_parity(cases: list[tuple[str, str]], tp_plan_style: str = "moe_tp_experts") -> dict[str, Any]:
    """Runs on every rank: the first fused experts module of each tiny ``model_type`` (conformance configs) with
    the given transformers experts implementation (``eager``, ``batched_mm``, ``grouped_mm``), split by
    ``moe_tp_experts`` over all ranks, against itself in one process: the output, the gradients of the hidden
    states and routing weights, and every gathered parameter gradient (worst relative error, or the error text),
    keyed ``"model_type/implementation"``."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    from meshplan.conformance.check import build_model, tiny_config
    from meshplan.state.packing import unpack_full_state_dict
    from meshplan.tensor_parallel.vocabulary import builtin_style

    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("tp",))
    results: dict[str, Any] = {}
    for model_type, implementation in cases:
        key = f"{model_type}/{implementation}"
        try:
            _, reference = next(find_expert_modules(build_model(tiny_config(model_type))))
            reference.config._experts_implementation = implementation
            module = parallelize_module(copy.deepcopy(reference), mesh, builtin_style(tp_plan_style))
            generator = torch.Generator().manual_seed(7)
            down = reference.down_proj  # [E, hidden, I], or [E, I, hidden] when transposed
            tokens, hidden, k = 24, down.shape[2 if getattr(reference, "is_transposed", False) else 1], 2
            hidden_states = torch.randn(tokens, hidden, generator=generator)
            index = torch.stack([torch.randperm(reference.num_experts, generator=generator)[:k] for _ in range(tokens)])
            weights = torch.rand(tokens, k, generator=generator)
            outputs, input_grads = [], []
            for m in (reference, module):
                x, w = hidden_states.clone().requires_grad_(), weights.clone().requires_grad_()
                out = m(x, index, w)
                (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
                outputs.append(out.detach())
                input_grads.append((x.grad, w.grad))
            grads = unpack_full_state_dict(module, {n: _full_tensor(p.grad) for n, p in module.named_parameters()})
            errors = {"output": relative_error(outputs[1], outputs[0]),
                      "hidden_states.grad": relative_error(input_grads[1][0], input_grads[0][0]),
                      "routing_weights.grad": relative_error(input_grads[1][1], input_grads[0][1])}
            errors.update({f"{n}.grad": relative_error(grads[n], p.grad) for n, p in reference.named_parameters()})
            results[key] = _worst(errors)
        except Exception as exc:  # noqa: BLE001 - reported per case
            results[key] = f"{type(exc).__name__}: {exc}"
    return results


def _full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
