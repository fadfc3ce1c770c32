"""Tiny models and rank-side checks for the plan tests.

Every check runs many architectures in one call of the persistent 2-rank gloo pool; each rank builds the
reference model itself (same seed, same weights), so nothing but small numbers travels back.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tests.support import TensorParallelOnly, full_grads, full_params, perturb, relative_error, tp_mesh

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=256, max_position_embeddings=64)
SLIDING = dict(head_dim=16, sliding_window=8, layer_types=["sliding_attention", "full_attention"])

#: name -> (transformers model type, config overrides). ``gemma3_vlm`` is built separately.
ARCHITECTURES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("llama", {}),
    "mistral": ("mistral", {"sliding_window": 8}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {"head_dim": 16}),
    "gemma3": ("gemma3_text", SLIDING),
    "phi3": ("phi3", {"pad_token_id": 0}),
    "gemma3_odd_vocab": ("gemma3_text", {**SLIDING, "vocab_size": 255}),  # not divisible by TP: uneven shards
    # without a built-in provider (Hugging Face fallback)
    "starcoder2": ("starcoder2", {}),
    "granite": ("granite", {}),
    "olmo2": ("olmo2", {}),
    "gpt_neox": ("gpt_neox", {}),
    "gemma2": ("gemma2", {"head_dim": 16}),
    # mixture of experts: 4 experts, top-2 routing; a dense first layer where the family has one
    "mixtral": ("mixtral", {"intermediate_size": 64, "head_dim": 16, "num_local_experts": 4,
                            "num_experts_per_tok": 2}),
    "qwen3_moe": ("qwen3_moe", {"head_dim": 16, "moe_intermediate_size": 32, "num_experts": 4,
                                "num_experts_per_tok": 2, "norm_topk_prob": True, "mlp_only_layers": [0]}),
    "deepseek_v3": ("deepseek_v3", {"num_key_value_heads": 4, "moe_intermediate_size": 32, "n_routed_experts": 4,
                                    "num_experts_per_tok": 2, "n_group": 1, "topk_group": 1,
                                    "first_k_dense_replace": 1, "n_shared_experts": 1, "q_lora_rank": 32,
                                    "kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8,
                                    "v_head_dim": 16}),
    # a hybrid: a Mamba2 layer (8 heads in 2 groups) and an attention layer, MoE MLPs with a shared MLP
    "granitemoehybrid": ("granitemoehybrid", {"intermediate_size": 32, "shared_intermediate_size": 32,
                                              "num_local_experts": 4, "num_experts_per_tok": 2,
                                              "layer_types": ["mamba", "attention"], "mamba_n_heads": 8,
                                              "mamba_d_head": 16, "mamba_n_groups": 2, "mamba_d_state": 16,
                                              "mamba_chunk_size": 16, "mamba_expand": 2}),
}
BUILTIN = ("llama", "mistral", "qwen2", "qwen3", "gemma3", "phi3", "gemma3_vlm")


def build(name: str, seed: int = 0, **overrides: Any) -> nn.Module:
    """A tiny fp32 model with random weights, every parameter perturbed (norm weights are not all ones, so a
    wrong norm gradient cannot hide)."""
    import transformers

    if name == "gemma3_vlm":
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      image_size=28, patch_size=14)
        config = transformers.Gemma3Config(text_config={**SMALL, **SLIDING, **overrides}, vision_config=vision,
                                           mm_tokens_per_image=4, image_token_index=250, boi_token_index=251,
                                           eoi_token_index=252)
        model_class = transformers.Gemma3ForConditionalGeneration
    else:
        model_type, settings = ARCHITECTURES[name]
        config = transformers.AutoConfig.for_model(model_type, **{**SMALL, **settings, **overrides})
        model_class = transformers.AutoModelForCausalLM._model_mapping[type(config)]
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return perturb(model_class(config).float(), seed + 1).train()


@dataclass
class Parity:
    """Worst relative errors of one TP run against the single-process reference."""

    logits: float
    grads: float
    worst_grad: str
    params_after_step: float
    logits_after_step: float
    same_parameters: bool
    source: str


def _inputs(name: str) -> dict[str, torch.Tensor]:
    """Token ids and labels; the VLM also gets one image (4 soft tokens between its markers) per sample."""
    generator = torch.Generator().manual_seed(123)
    ids = torch.randint(0, 250, (2, 16), generator=generator)
    inputs = {"input_ids": ids, "labels": torch.randint(0, 250, (2, 16), generator=generator)}
    if name == "gemma3_vlm":
        ids[:, 2], ids[:, 3:7], ids[:, 7] = 251, 250, 252
        token_types = torch.zeros_like(ids)
        token_types[:, 3:7] = 1
        inputs.update(pixel_values=torch.randn(2, 3, 28, 28, generator=generator), token_type_ids=token_types,
                      labels=inputs["labels"].masked_fill(token_types == 1, -100))
    return inputs


def _step(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(**inputs)
    out.loss.backward()
    return out.logits.detach()


def parity(name: str, sequence_parallel: bool, lr: float = 0.5) -> Parity:
    """Runs on every rank: forward + backward + one SGD step, TP (or TP+SP) vs the same model unsharded.

    Every parameter's gradient must exist on both sides. Gradients are compared relative to their own scale,
    floored at 1e-3 of the largest gradient (some are analytically ~0, e.g. a k_proj bias under softmax, and
    then pure rounding noise)."""
    import meshplan

    reference = build(name)
    model = copy.deepcopy(reference)
    names = [n for n, _ in reference.named_parameters()]
    inputs = _inputs(name)
    ref_logits = _step(reference, inputs)
    meshplan.parallelize(model, tp_mesh(), strategy="tp_test", sequence_parallel=sequence_parallel)
    logits = _step(model, inputs)

    ref_grads = {n: p.grad.detach() for n, p in reference.named_parameters() if p.grad is not None}
    grads = full_grads(model)
    if grads.keys() != ref_grads.keys():
        raise AssertionError(f"parameters with gradients differ: {sorted(grads.keys() ^ ref_grads.keys())}")
    floor = 1e-3 * max(float(g.abs().max()) for g in ref_grads.values())
    grad_errors = {n: relative_error(grads[n], ref_grads[n], floor) for n in ref_grads}
    worst = max(grad_errors, key=grad_errors.get)

    for m in (reference, model):
        torch.optim.SGD(m.parameters(), lr=lr).step()
        m.zero_grad()
    params, ref_params = full_params(model), dict(reference.named_parameters())
    inputs.pop("labels")
    with torch.no_grad():
        after, ref_after = model(**inputs).logits, reference(**inputs).logits
    return Parity(
        logits=relative_error(logits, ref_logits),
        grads=grad_errors[worst],
        worst_grad=worst,
        params_after_step=max(relative_error(params[n], ref_params[n].detach()) for n in ref_params),
        logits_after_step=relative_error(after, ref_after),
        same_parameters=[n for n, _ in model.named_parameters()] == names,
        source=meshplan.get_report(model)["plan"]["source"],
    )


def parity_cases(cases: list[tuple[str, bool]]) -> dict[tuple[str, bool], Parity | str]:
    """Runs on every rank: :func:`parity` for each ``(architecture, sequence_parallel)``; an error becomes
    its message so one failing case does not hide the others."""
    import meshplan

    meshplan.register_strategy(TensorParallelOnly)
    results: dict[tuple[str, bool], Parity | str] = {}
    for case in cases:
        try:
            results[case] = parity(*case)
        except Exception as exc:  # noqa: BLE001 - reported per case
            results[case] = f"{type(exc).__name__}: {exc}"
    return results
