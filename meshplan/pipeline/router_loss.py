"""The MoE load-balancing (router auxiliary) loss of a Hugging Face model across pipeline stages, as one process
computes it.

transformers' ``load_balancing_loss_func`` (Mixtral, Qwen2-MoE, Qwen3-MoE, ...) takes the router logits of every
MoE layer of a batch and returns ``E * sum_e (T_e / N) * (P_e / N)``: ``T_e`` the top-k assignments to expert
``e``, ``P_e`` the summed routing probabilities, ``N`` the rows (tokens x layers, padding excluded). That is not a
sum of per-stage terms (the product couples the layers of different stages), but ``T``, ``P`` and ``N`` are sums
over layers. So every stage adds its layers' sums to the ones it receives and sends them on next to its hidden
states (:func:`add_router_sums`), and the last stage adds ``coef * loss(sums)`` to the microbatch's loss
(:func:`meshplan.pipeline.model.with_router_loss`). ``P`` stays differentiable: the backward carries
``d loss / d P`` (``coef * E * T / N**2``) to the routers of every stage, so losses and gradients are those of one
process.

Like gradient accumulation in one process, the loss is the mean of the microbatches' losses, each with the
auxiliary loss of its own tokens (the product of batch means cannot be computed before every microbatch's forward,
which 1F1B-style schedules interleave with backwards); with ``pp_microbatches=1`` it is the whole batch's.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..core.errors import PipelineError


def uses_router_loss(model: nn.Module) -> bool:
    """Whether ``model``'s config asks for the router auxiliary loss (``output_router_logits=True``)."""
    config = getattr(model, "config", None)
    return config is not None and bool(getattr(config.get_text_config(), "output_router_logits", False))


def experts(model: nn.Module) -> tuple[int, int, float]:
    """``(num_experts, num_experts_per_tok, router_aux_loss_coef)`` of a transformers MoE causal LM."""
    return model.num_experts, model.num_experts_per_tok, float(model.router_aux_loss_coef)


def router_sums(router_logits: Sequence[torch.Tensor], num_experts: int, top_k: int,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``[T (num_experts) | P (num_experts) | N]`` summed over ``router_logits`` (one ``[tokens, experts]`` tensor
    per layer), rows weighted by the flattened 2-D ``attention_mask`` when given (padding does not count)."""
    sums = torch.zeros(2 * num_experts + 1)
    if router_logits:
        sums = sums.to(router_logits[0].device)
    weight = None if attention_mask is None else attention_mask.reshape(-1).to(sums.device, torch.float32)
    for logits in router_logits:
        probs = torch.nn.functional.softmax(logits, dim=-1).float()
        selected = torch.topk(probs, top_k, dim=-1).indices
        rows = torch.ones(len(probs), device=probs.device) if weight is None else weight
        counts = torch.zeros(num_experts, device=probs.device).scatter_add(
            0, selected.reshape(-1), rows.repeat_interleave(top_k))
        sums = sums + torch.cat((counts, (probs * rows.unsqueeze(-1)).sum(dim=0), rows.sum().reshape(1)))
    return sums


def router_loss(sums: torch.Tensor, num_experts: int) -> torch.Tensor:
    """transformers' load-balancing loss from :func:`router_sums` of every layer: ``E * sum_e T_e P_e / N**2``."""
    counts, probs, rows = sums[:num_experts], sums[num_experts:2 * num_experts], sums[2 * num_experts]
    return num_experts * torch.sum((counts.detach() / rows.detach()) * (probs / rows.detach()))


def add_router_sums(stage: nn.Module, outputs: Any, attention_mask: torch.Tensor | None,
                    received: Sequence[torch.Tensor]) -> torch.Tensor:
    """The router sums a stage sends on: the ones it ``received`` (none on the first stage) plus its own layers'."""
    num_experts, top_k, _ = experts(stage)
    own = router_sums(outputs.router_logits or (), num_experts, top_k, attention_mask)
    return own + received[0] if received else own


def check_router_loss(model: nn.Module) -> None:
    """:class:`PipelineError` unless the pipeline computes ``model``'s router loss exactly: the model names its
    experts (``num_experts``, ``num_experts_per_tok``, ``router_aux_loss_coef``) and its modeling file's
    ``load_balancing_loss_func`` gives what :func:`router_loss` of summed layers gives (a probe on fixed logits,
    with and without padding; collective-free, the same on every rank)."""
    name = type(model).__qualname__
    reference = getattr(sys.modules.get(type(model).__module__), "load_balancing_loss_func", None)
    if reference is None or not all(hasattr(model, a) for a in ("num_experts", "num_experts_per_tok",
                                                                  "router_aux_loss_coef")):
        raise PipelineError(
            f"{name} asks for a router auxiliary loss (config.output_router_logits=True) that meshplan cannot split "
            "over pipeline stages: it has no transformers load_balancing_loss_func and num_experts / "
            "num_experts_per_tok / router_aux_loss_coef. Set output_router_logits=False, or use pp=1.")
    num_experts, top_k, _ = experts(model)
    generator = torch.Generator().manual_seed(0)
    layers = tuple(torch.randn(6, num_experts, generator=generator) for _ in range(3))
    for mask in (None, torch.tensor([[1, 1, 0], [1, 1, 1]])):
        expected = reference(layers, num_experts, top_k, mask)
        staged = router_sums(layers[:1], num_experts, top_k, mask) + router_sums(layers[1:], num_experts, top_k, mask)
        if not torch.allclose(router_loss(staged, num_experts), torch.as_tensor(expected, dtype=torch.float32),
                              rtol=1e-5, atol=0):
            raise PipelineError(
                f"{name}'s load_balancing_loss_func is not transformers' Switch-Transformer loss over summed router "
                "statistics, so pipeline stages cannot compute it exactly from each stage's layers (the loss couples "
                "the router logits of every layer). Set output_router_logits=False, or use pp=1.")
