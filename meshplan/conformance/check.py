"""TP=2 conformance check of one transformers causal-LM model type (shared by ``bench/conformance.py`` and
``tests/conformance/test_tp_subset.py``).

* :func:`model_types_with_tp_plan` — every causal-LM model type of the installed transformers whose config (or
  a sub-config) declares ``base_model_tp_plan`` or whose model class declares ``_tp_plan``.
* :func:`tiny_config` — a small config of that type: layers, widths, heads, vocab, experts, low-rank and
  linear-attention sizes shrunk consistently, per-layer lists cut down to one layer of each kind, dropout off.
* :func:`check_architecture` — runs on every rank of a 2-rank gloo pool: builds the model with random weights
  (same seed on every rank), runs forward + backward once unsharded (the reference) and once after
  ``meshplan.prepare(...).apply()`` with a TP-only strategy, i.e. the plan ``meshplan.parallelize`` resolves
  and validates, and compares logits and gathered parameter gradients. Returns a small picklable dict.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import math
import re
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import transformers
from torch import nn
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

import meshplan

from ..core.errors import UnmatchedPlanKeyError
from ..plugins.manager import get_registry
from ..plugins.testing import TensorParallelOnly, tp_mesh
from .parity import full_grads, perturb, relative_error

#: Relative tolerance (fp32), relative to the reference tensor's max |value|.
RTOL = 1e-5
#: Gradients are scaled by max(own max |g|, GRAD_FLOOR x the model's largest |g|): some gradients are
#: analytically zero (a key bias under softmax) and then pure rounding noise.
GRAD_FLOOR = 1e-3
SEED = 0
BATCH, SEQ_LEN = 2, 16
#: Input ids are drawn below this; multimodal special tokens are moved above it.
TOKEN_LIMIT = 200
VOCAB = 256

#: Generic sizes, applied to every config field of that name whose default is not None.
SHRINK: dict[str, Any] = {
    "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 128, "num_hidden_layers": 2,
    # gpt-style names
    "n_embd": 64, "n_head": 4, "n_layer": 2, "n_inner": 128, "n_positions": 128, "n_ctx": 128,
    "d_model": 64, "n_heads": 4, "n_layers": 2, "num_layers": 2, "max_seq_len": 128,
    # mixture of experts
    "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32, "shared_intermediate_size": 32,
    "shared_experts_intermediate_size": 32, "expert_ffn_hidden_size": 32, "ffn_hidden_size": 128,
    "intermediate_size_mlp": 128, "prefix_dense_intermediate_size": 128,
    "num_experts": 4, "n_routed_experts": 4, "num_local_experts": 4, "moe_num_experts": 4,
    "num_experts_per_tok": 2, "num_experts_per_token": 2, "moe_topk": 2, "moe_k": 2, "moe_top_k": 2,
    "top_k_experts": 2, "n_shared_experts": 1, "num_shared_experts": 1, "moe_num_shared_experts": 1,
    "n_group": 1, "topk_group": 1, "num_expert_group": 1, "first_k_dense_replace": 1, "num_dense_layers": 1,
    "router_jitter_noise": 0.0, "moe_jitter_eps": 0.0, "zero_expert_num": 1,
    # multi-head latent attention / sparse indexers
    "q_lora_rank": 32, "kv_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16,
    "qk_head_dim": 16, "o_lora_rank": 32, "index_head_dim": 16, "index_n_heads": 2, "index_topk": 8,
    "indexer_n_heads": 2, "indexer_head_dim": 16, "indexer_kv_heads": 1,
    # local / sliding attention
    "sliding_window": 8, "sliding_window_size": 8, "attention_chunk_size": 8, "chunk_size": 8,
    "swa_num_attention_heads": 4, "swa_num_key_value_heads": 2, "swa_head_dim": 16,
    # linear attention, state-space and convolution mixers
    "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 16,
    "linear_value_head_dim": 16, "linear_num_heads": 4, "linear_head_dim": 16, "linear_conv_kernel_dim": 4,
    "mamba_n_heads": 4, "mamba_d_head": 16, "mamba_d_state": 16, "mamba_n_groups": 2, "mamba_chunk_size": 16,
    "mamba_d_ssm": 64, "mamba_dt_rank": 8,
    "mamba_num_heads": 8, "mamba_head_dim": 16, "ssm_state_size": 16, "kv_n_heads": 2, "num_kv_shared_layers": 0,
    "rel_extent": 128,  # relative-position bias distances (Inkling), shrunk with max_position_embeddings
    "unpadded_vocab_size": VOCAB, "H_cycles": 1, "L_cycles": 1,
    "hc_lowrank": 16, "adapter_in_dim": 64, "adapter_out_dim": 64, "adapter_input_size": 64,
    # per-layer inputs (Gemma 3n / 4), multi-token prediction, misc widths
    "vocab_size_per_layer_input": VOCAB, "hidden_size_per_layer_input": 16, "laurel_rank": 8,
    "num_nextn_predict_layers": 0, "num_mtp_layers": 0, "rotary_dim": 8, "query_pre_attn_scalar": 16,
    "backbone_hidden_size": 64, "num_centroids": 16, "centroid_intermediate_top_k": 4,
    # vision / audio towers (built, not run: the check feeds text only)
    "depth": 1, "num_heads": 4, "out_hidden_size": 64, "num_position_embeddings": 64, "conf_num_hidden_layers": 1,
    "conf_num_attention_heads": 4, "projector_input_dim": 64, "projector_output_dim": 64,
    "vision_output_dim": 64, "mm_tokens_per_image": 4,
}
#: Fields set even where the default is ``None`` (models read them without a fallback).
ALWAYS_SET = frozenset({"head_dim", "num_key_value_heads"})
_MISSING = object()
#: Special-token ids that must stay outside the ids the check feeds (moved to VOCAB - 16 + i).
MULTIMODAL_TOKENS = ("image_token_id", "image_token_index", "video_token_id", "audio_token_id",
                     "audio_token_index", "boi_token_id", "eoi_token_id", "boi_token_index", "eoi_token_index",
                     "boa_token_id", "eoa_token_id", "eoa_token_index", "vision_start_token_id",
                     "vision_end_token_id", "image_start_token_id", "image_end_token_id")
TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id", "eod_token_id", "sep_token_id")
#: Per model type: ``{sub-config name or "": {field: value}}`` applied after the generic shrink.
OVERRIDES: dict[str, dict[str, dict[str, Any]]] = {
    # Mamba heads x head dim must equal mamba_expand x hidden_size
    "bamba": {"": {"mamba_n_heads": 8}},
    # rotary tables are built per layer type, but the default rope_parameters is {}
    "cohere_compass_text": {"": {"rope_parameters": {"full_attention": {"rope_type": "default",
                                                                        "rope_theta": 10000.0}}}},
    # the model reads attn_config.rope_theta, which the default attention config lacks
    "dbrx": {"attn_config": {"rope_theta": 10000.0, "clip_qkv": 8.0}},
    # routed-expert counts default to None
    "deepseek_v2": {"": {"num_experts_per_tok": 2}},
    "dots1": {"": {"n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1}},
    "granitemoehybrid": {"": {"mamba_n_heads": 8}},
    # the three layer groups must add up to num_hidden_layers
    "dory": {"": {"n_input_layers": 1, "n_recurrent_layers": 1, "n_output_layers": 1, "num_hidden_layers": 3,
                  "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]}},
    # SWA layers of Dots 3 are configured through swa_* arguments (MLA: as many KV heads as heads)
    "dots3_note": {"text_config": {"swa_num_attention_heads": 4, "swa_num_key_value_heads": 4,
                                   "swa_q_lora_rank": 32, "swa_kv_lora_rank": 32, "swa_head_dim": 16,
                                   "swa_qk_nope_head_dim": 8, "swa_v_head_dim": 16}},
    "dots3_note_text": {"": {"swa_num_attention_heads": 4, "swa_num_key_value_heads": 4, "swa_q_lora_rank": 32,
                             "swa_kv_lora_rank": 32, "swa_head_dim": 16, "swa_qk_nope_head_dim": 8,
                             "swa_v_head_dim": 16}},
    # full-attention layers of Gemma 4 take their head dim from a separate argument
    **{t: {"text_config": {"global_head_dim": 32}} for t in ("gemma4", "gemma4_unified", "gemma4_unified_assistant")},
    **{t: {"": {"global_head_dim": 32}} for t in ("gemma4_text", "gemma4_unified_text")},
    "gemma4_assistant": {"text_config": {"hidden_size_per_layer_input": 0, "vocab_size_per_layer_input": 0,
                                         "global_head_dim": 32}},
    # the rotary part of the MLA query/key uses head_dim
    "longcat_flash": {"": {"head_dim": 8}},
    # ZAYA routes every token to one expert only
    "zaya": {"": {"num_experts_per_tok": 1}},
    # the default layer_types is None, which the model cannot build
    "lfm2_moe": {"": {"layer_types": ["conv", "full_attention"], "num_dense_layers": 1}},
    # indexed-attention layers need the QSA indexer fields, which default to None
    "qwen4_exp": {"text_config": {"indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 16,
                                  "indexer_budget": 8, "indexer_compress_ratio": 2}},
    "qwen4_exp_text": {"": {"indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 16,
                            "indexer_budget": 8, "indexer_compress_ratio": 2}},
}


# --- enumeration -----------------------------------------------------------------------------------
def plan_declaration(model_type: str) -> str | None:
    """Where ``model_type``'s TP plan comes from: ``"config"`` (``base_model_tp_plan`` on the config or a
    sub-config, class or default instance), ``"class"`` (only the model class ``_tp_plan``), ``"meshplan"`` (no
    transformers plan, but a built-in meshplan provider serves the class, e.g. ZAYA) or ``None``."""
    config_class = CONFIG_MAPPING[model_type]
    if any(getattr(c, "base_model_tp_plan", None) for c in [config_class, *sub_config_classes(config_class)]):
        return "config"
    try:
        config = config_class()
    except Exception:  # noqa: BLE001 - an invalid default config: the class attributes decide
        config = None
    if config is not None and any(getattr(c, "base_model_tp_plan", None)
                                  for c in [config, *_sub_configs(config).values()]):
        return "config"
    model_class = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type], None)
    if getattr(model_class, "_tp_plan", None):
        return "class"
    return "meshplan" if model_class is not None and _builtin_provider(model_class) else None


def _builtin_provider(model_class: type) -> bool:
    """Whether a built-in meshplan provider other than the Hugging Face fallback serves ``model_class``."""
    found = get_registry().find_tp_plan(model_class)
    name = found[1].target_name() if found else ""
    return name.startswith("meshplan.plans.") and not name.startswith("meshplan.plans.hf")


def sub_config_classes(config_class: type) -> list[type]:
    found = []
    for spec in dict(getattr(config_class, "sub_configs", None) or {}).values():
        cls = getattr(spec, "config_class", spec)
        if isinstance(cls, type):
            found.append(cls)
    return found


def model_types_with_tp_plan() -> list[str]:
    """Causal-LM model types (``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``) that declare a transformers TP plan or that a
    built-in meshplan provider serves."""
    return [t for t in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES if plan_declaration(t)]


# --- tiny configs ----------------------------------------------------------------------------------
def _get(config: Any, key: str) -> Any:
    getter = getattr(config, "_getattr_without_heterogeneous_validation", None)
    return getter(key, None) if getter else getattr(config, key, None)


def _fields(config: Any) -> dict[str, Any]:
    """The config's constructor fields and their current values (per-layer configs: the global value)."""
    if dataclasses.is_dataclass(config):
        return {f.name: _get(config, f.name) for f in dataclasses.fields(config) if f.init}
    return dict(config.to_dict())


def _layer_count_key(values: dict[str, Any]) -> str | None:
    return next((k for k in ("num_hidden_layers", "n_layer", "n_layers", "num_layers") if values.get(k)), None)


def _is_index_list(key: str, value: Any, layers: int) -> bool:
    return (isinstance(value, list) and bool(value) and any(s in key for s in ("layer", "idx", "index", "indices"))
            and all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < layers for i in value))


def _kept_layers(values: dict[str, Any], old: int, wanted: int) -> list[int] | None:
    """Old layer indices to keep: the first layer of each distinct kind (all per-layer lists and layer-index
    lists together, at most 4 kinds), then more layers up to ``wanted``."""
    per_layer = [v for v in values.values() if isinstance(v, list) and len(v) == old and old > 1]
    index_lists = [v for k, v in values.items() if _is_index_list(k, v, old) and not (
        isinstance(v, list) and len(v) == old)]
    if not per_layer and not index_lists:
        return None
    kinds: dict[tuple, int] = {}
    for i in range(old):
        kind = tuple(str(v[i]) for v in per_layer) + tuple(i in v for v in index_lists)
        kinds.setdefault(kind, i)
    keep = sorted(list(kinds.values())[:4])
    extra = (i for i in range(old) if i not in keep)
    while len(keep) < min(wanted, old):
        keep = sorted([*keep, next(extra)])
    return keep


def shrink_fields(config: Any, model_type: str = "", name: str = "") -> dict[str, Any]:
    """Constructor keyword arguments that make ``config`` tiny (see :data:`SHRINK`); fields not named here
    keep their class defaults, so values derived in ``__post_init__`` are derived again."""
    values = _fields(config)
    kwargs: dict[str, Any] = {}
    for key, value in SHRINK.items():
        current = values.get(key, _MISSING)
        if current is None and key in ALWAYS_SET:
            kwargs[key] = value
        elif current is not _MISSING and current is not None and not isinstance(current, (bool, list, dict)):
            kwargs[key] = type(current)(value) if isinstance(current, (int, float)) else value
        elif isinstance(current, list) and current and all(isinstance(v, int) and v > 1 for v in current):
            kwargs[key] = [value] * len(current)  # a per-layer size (e.g. Gemma 3n intermediate_size)
    for key, value in values.items():
        if isinstance(value, float) and ("dropout" in key or "pdrop" in key) and value:
            kwargs[key] = 0.0
    if values.get("kv_lora_rank") and "num_attention_heads" in kwargs:
        kwargs["num_key_value_heads"] = kwargs["num_attention_heads"]  # multi-head latent attention: no GQA
    layers_key = _layer_count_key(values)
    if layers_key:
        old, wanted = int(values[layers_key]), int(kwargs.get(layers_key, values[layers_key]))
        keep = _kept_layers(values, old, wanted)
        if keep is not None:
            kwargs[layers_key] = len(keep)
            for key, value in values.items():
                if isinstance(value, list) and len(value) == old:
                    kwargs[key] = [kwargs.get(key, value)[i] for i in keep]
                elif _is_index_list(key, value, old):
                    kwargs[key] = [keep.index(i) for i in value if i in keep]
    vocab = kwargs.get("vocab_size", values.get("vocab_size"))
    if vocab:
        for i, key in enumerate(MULTIMODAL_TOKENS):
            if isinstance(values.get(key), int) and not isinstance(values.get(key), bool):
                kwargs[key] = vocab - 16 + i
        for i, key in enumerate(TOKEN_IDS):
            value = values.get(key)
            if isinstance(value, int) and value >= vocab:
                kwargs[key] = i
            elif isinstance(value, list):
                kwargs[key] = [v if v < vocab else i for v in value]
    kwargs.update(OVERRIDES.get(model_type, {}).get(name, {}))
    return kwargs


def _sub_configs(config: Any) -> dict[str, Any]:
    names = getattr(config, "sub_configs", None) or {}
    return {n: c for n in names if (c := getattr(config, n, None)) is not None and hasattr(c, "to_dict")}


def _tiny_kwargs(config: Any, model_type: str, name: str = "") -> dict[str, Any]:
    kwargs = shrink_fields(config, model_type, name)
    specs = getattr(type(config), "sub_configs_defaults", None) or {}
    for sub, child in _sub_configs(config).items():
        init = dict(getattr(specs.get(sub), "init_kwargs", None) or {})
        kwargs[sub] = {**init, **_tiny_kwargs(child, model_type, sub), "model_type": child.model_type}
    return kwargs


def tiny_config(model_type: str) -> Any:
    """A small config of ``model_type`` (see :data:`SHRINK` and :data:`OVERRIDES`), eager attention."""
    config_class = CONFIG_MAPPING[model_type]
    try:
        default = config_class()
    except Exception:  # noqa: BLE001 - invalid defaults: start from the overrides
        default = config_class(**{k: v for k, v in OVERRIDES.get(model_type, {}).items() if k})
    config = config_class(**_tiny_kwargs(default, model_type))
    _eager(config)
    return config


def _eager(config: Any) -> None:
    for sub in [config, *(getattr(config, n, None) for n in getattr(config, "sub_configs", None) or {})]:
        if sub is not None and hasattr(sub, "_attn_implementation"):
            try:
                sub._attn_implementation = "eager"
            except Exception:  # noqa: BLE001 - some sub-configs refuse; keep their default
                pass


def text_config(config: Any) -> Any:
    """The sub-config that describes the language model."""
    try:
        return config.get_text_config()
    except ValueError:
        return getattr(config, "decoder", config)


# --- models --------------------------------------------------------------------------------------
def build_model(config: Any, seed: int = SEED) -> nn.Module:
    """The causal LM for ``config`` in fp32 with random weights, every float parameter perturbed (norm
    weights are not all ones, routers not all zeros), in train mode (dropout is off in the config)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return perturb(model, seed + 1).float().train()


def make_batch(config: Any) -> tuple[torch.Tensor, torch.Tensor]:
    vocab = int(getattr(text_config(config), "vocab_size", None) or VOCAB)
    generator = torch.Generator().manual_seed(SEED + 123)
    ids = torch.randint(3, min(vocab, TOKEN_LIMIT), (BATCH, SEQ_LEN), generator=generator)
    return ids, torch.randint(0, min(vocab, TOKEN_LIMIT), (BATCH, SEQ_LEN), generator=generator)


def _logits(output: Any) -> torch.Tensor:
    logits = output.logits if hasattr(output, "logits") else output[0]

    return logits.full_tensor() if isinstance(logits, DTensor) else logits


def forward_backward(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Logits of ``model(input_ids=ids)`` and the gradients of their cross-entropy against ``labels``."""
    torch.manual_seed(SEED + 7)
    logits = _logits(model(input_ids=ids, use_cache=False))
    loss = nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1))
    loss.backward()
    return logits.detach()


# --- the check (runs on every rank) ---------------------------------------------------------------
def _is_sharded(param: torch.Tensor) -> bool:
    return isinstance(param, DTensor) and any(not (p.is_replicate() or p.is_partial()) for p in param.placements)


def sharded_fraction(model: nn.Module) -> float:
    """The fraction of ``model``'s parameter elements that are split over the ranks (``Shard`` or ``_StridedShard``)."""
    total = sharded = 0
    for param in model.parameters():
        total += param.numel()
        sharded += param.numel() if _is_sharded(param) else 0
    return sharded / total if total else 0.0


def largest_replicated(model: nn.Module, count: int = 3) -> list[tuple[str, float]]:
    """The ``count`` largest groups of parameters left whole, as ``(name with layer indices as *, fraction of all
    parameter elements)``, largest first."""
    total, whole = 0, collections.Counter()
    for name, param in model.named_parameters():
        total += param.numel()
        if not _is_sharded(param):
            whole[re.sub(r"\.\d+\.", ".*.", name)] += param.numel()
    return [(name, size / total) for name, size in whole.most_common(count)] if total else []


def failure_reason(stage: str, exc: BaseException) -> str:
    message = " ".join(str(exc).split())
    if len(message) > 240:
        message = message[:237] + "..."
    return f"{stage}: {type(exc).__name__}: {message}"


def _unmatched_reason(exc: BaseException, shown: int = 4) -> str:
    keys = re.findall(r"'([^']+)' \(closest modules", str(exc))
    listing = ", ".join(f"`{k}`" for k in keys[:shown]) + (f" (+{len(keys) - shown} more)" if len(keys) > shown else "")
    return f"plan: UnmatchedPlanKeyError (strict): {len(keys)} key(s) match no module: {listing}"


def _compare(reference: nn.Module, model: nn.Module, ref_logits: torch.Tensor, logits: torch.Tensor,
             rtol: float) -> tuple[list[str], dict[str, Any]]:
    problems: list[str] = []
    ref_names = [n for n, _ in reference.named_parameters()]
    names = [n for n, _ in model.named_parameters()]
    if names != ref_names:
        extra, missing = sorted(set(names) - set(ref_names)), sorted(set(ref_names) - set(names))
        problems.append(f"parameter names differ (extra {extra[:3]}, missing {missing[:3]})")
    logit_error = relative_error(logits, ref_logits) if logits.shape == ref_logits.shape else math.inf
    if logit_error > rtol:
        problems.append(f"logits rel. error {logit_error:.2e}" if logit_error < math.inf else
                        f"logits shape {tuple(logits.shape)} vs {tuple(ref_logits.shape)}")
    ref_grads = {n: None if p.grad is None else p.grad.detach() for n, p in reference.named_parameters()}
    grads = full_grads(model)
    largest = max((float(g.abs().max()) for g in ref_grads.values() if g is not None and g.numel()), default=0.0)
    errors: dict[str, float] = {}
    for name, want in ref_grads.items():
        got = grads.get(name)
        if want is None and got is None:
            continue
        want = torch.zeros_like(got) if want is None else want
        got = torch.zeros_like(want) if got is None else got
        errors[name] = relative_error(got, want, GRAD_FLOOR * largest) if got.shape == want.shape else math.inf
    worst = max(errors, key=errors.get, default=None)
    grad_error = errors[worst] if worst else 0.0
    if grad_error > rtol:
        problems.append(f"grad {worst} rel. error {grad_error:.2e}")
    return problems, {"logits_error": logit_error, "grad_error": grad_error, "worst_grad": worst}


def _registered_provider(model: nn.Module) -> str | None:
    found = get_registry().find_tp_plan(type(model))
    return f"provider {found[1].target_name()}" if found else None


def run_check(model_type: str, config: Any, mesh: Callable[[], Any], strategy: type, axis: str,
              rtol: float = RTOL, **options: Any) -> dict[str, Any]:
    """Runs on every rank: forward + backward parity of ``model_type`` (built from ``config``) against the
    unsharded model, after ``meshplan.prepare(model, mesh(), strategy, **options).apply()``; ``axis`` (``"TP"`` or
    ``"EP"``) names the plan checked in reasons and picks which plan's source is reported.

    Never raises for a model problem: the result's ``status`` is ``"pass"`` or ``"fail"`` with a short
    ``reason`` (the failing stage, exception type and message head, or the worst tensor and its error).
    """
    start = time.perf_counter()
    result: dict[str, Any] = {"model_type": model_type, "status": "fail", "reason": ""}
    stage, strict_error = "build", ""
    try:
        reference = build_model(config)
        model = copy.deepcopy(reference)
        result["model_class"] = type(model).__name__
        result["parameters"] = sum(p.numel() for p in reference.parameters())
        ids, labels = make_batch(config)
        stage = "reference forward/backward"
        ref_logits = forward_backward(reference, ids, labels)
        stage = f"{axis} plan"
        meshplan.register_strategy(strategy)
        if axis == "TP" and options.get("tp_plan") is None:  # named even when preparing fails
            result["plan_source"] = _registered_provider(model)
        try:
            prepared = meshplan.prepare(model, mesh(), strategy=strategy.name, **options)
        except UnmatchedPlanKeyError as exc:  # diagnose further: does the rest of the plan work?
            strict_error = _unmatched_reason(exc)
            prepared = meshplan.prepare(model, mesh(), strategy=strategy.name, strict=False, **options)
        plan = prepared.plan if axis == "TP" else prepared.ep_plan
        result["plan_source"] = plan.source if plan else None
        stage = f"apply {axis} plan"
        prepared.apply()
        result["sharded_fraction"] = sharded_fraction(model)
        result["largest_replicated"] = largest_replicated(model)
        stage = f"{axis} forward/backward"
        logits = forward_backward(model, ids, labels)
        stage = "compare"
        problems, numbers = _compare(reference, model, ref_logits, logits, rtol)
        result.update(numbers)
        result["status"] = "fail" if problems or strict_error else "pass"
        result["reason"] = "; ".join(problems)
        if strict_error:
            result["reason"] = f"{strict_error}; with strict=False: {result['reason'] or f'{axis} parity holds'}"
    except Exception as exc:  # noqa: BLE001 - reported in the result
        result["reason"] = failure_reason(stage, exc)
        if strict_error:
            result["reason"] = f"{strict_error}; with strict=False: {result['reason']}"
        result["traceback"] = traceback.format_exc(limit=-6)
    result["stage"] = stage
    result["seconds"] = time.perf_counter() - start
    return result


def check_architecture(model_type: str, rtol: float = RTOL, tp_plan: Any = None) -> dict[str, Any]:
    """Runs on every rank: TP=2 forward + backward parity of ``model_type`` (see :func:`run_check`).

    ``tp_plan`` (optional, e.g. a dotted path to a plan function) is passed to ``meshplan.prepare`` to check a
    candidate plan instead of the registered one.
    """
    seen: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(seen, model_type)
    if len(set(seen)) != 1:
        raise RuntimeError(f"ranks are out of step: they are running {seen}")
    try:
        config = tiny_config(model_type)
    except Exception as exc:  # noqa: BLE001 - reported in the result
        return {"model_type": model_type, "status": "fail", "reason": failure_reason("config", exc), "stage": "config",
                "rank": dist.get_rank()}
    result = run_check(model_type, config, tp_mesh, TensorParallelOnly, "TP", rtol, tp_plan=tp_plan)
    return result | {"rank": dist.get_rank()}


def check_architectures(model_types: list[str], rtol: float = RTOL) -> dict[str, dict[str, Any]]:
    """Runs on every rank: :func:`check_architecture` for each type, in order."""
    return {t: check_architecture(t, rtol) for t in model_types}


def merge_rank_results(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One result from every rank's: a failure on any rank wins (ranks must agree on the status)."""
    failed = [r for r in results if r["status"] != "pass"]
    merged = dict(failed[0] if failed else results[0])
    merged["seconds"] = max(r.get("seconds", 0.0) for r in results)
    if len({r["status"] for r in results}) > 1:
        merged["reason"] = f"ranks disagree: {merged['reason']}"
    return merged
