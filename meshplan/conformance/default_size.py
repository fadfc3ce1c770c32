"""Sharded fraction of each model type at its default config's size (the ``default size`` columns of
``bench/conformance.py``).

The parity check (:mod:`meshplan.conformance.check`) runs tiny configs, where small per-layer parts that a plan keeps
whole by design (routers, norms, MLA down-projections) weigh far more than in the real model, and experts far less.
Here the model is built from its default config (transformers' defaults are mostly the flagship checkpoint's
shapes) on the meta device, so without weights or downloads; the TP=2 (or EP=2) plan is resolved, validated and
applied as in the parity check, on a fake 2-rank world, and the fraction of parameter elements split over the ranks
is measured. Nothing is computed, so no parity is checked here.

* :data:`DEFAULT_OVERRIDES` / :func:`default_config` — the default config, with the few that do not build fixed.
* :func:`measure` — one model type and axis, inside a fake world.
* :func:`measure_all` — every type, in a fake world of its own (this process must hold no process group).
* :func:`measure_in_subprocess` — :func:`measure_all` in one spawned process, for a caller that holds or will
  hold a gloo process group (a fake world cannot share a process with it).
"""

from __future__ import annotations

import logging
import multiprocessing
from typing import Any

import torch
from transformers import AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

import meshplan

from ..core.errors import ExpertParallelError, TensorParallelSizeError
from ..core.fake_pg import fake_process_group
from ..plugins.testing import TensorParallelOnly, tp_mesh
from .check import OVERRIDES, failure_reason, largest_replicated, sharded_fraction
from .expert_check import EP_SIZE, ep_mesh, ep_only_strategy

WORLD_SIZE = 2
AXES = ("TP", "EP")
#: Qwen4-Exp's QSA indexer fields (None by default; the checkpoint's values are not in transformers): one key head
#: as the config requires, a budget divisible by the compress ratio, a head dim that fits the rotary dim (256).
_QSA = {"indexer_n_heads": 16, "indexer_kv_heads": 1, "indexer_head_dim": 256, "indexer_budget": 2048,
        "indexer_compress_ratio": 4}
#: Per model type: ``{sub-config name or "": {field: value}}`` for default configs that do not build.
DEFAULT_OVERRIDES: dict[str, dict[str, dict[str, Any]]] = {
    # the same size-independent problems as the tiny configs have (rotary settings the default lacks)
    **{t: OVERRIDES[t] for t in ("cohere_compass_text", "dbrx")},
    # routed-expert counts default to None: the dots.llm1 checkpoint's 128 routed experts (top 6) and 2 shared
    "dots1": {"": {"n_routed_experts": 128, "num_experts_per_tok": 6, "n_shared_experts": 2}},
    # the assistant (drafter) config requires no per-layer inputs, but the text default has them
    "gemma4_assistant": {"text_config": {"hidden_size_per_layer_input": 0, "vocab_size_per_layer_input": 0}},
    # head_dim / num_key_value_heads default to None and the attention reads them without a fallback:
    # hidden_size // num_attention_heads, and multi-head attention (the documented default)
    **{t: {"": {"head_dim": 128}} for t in ("hunyuan_v1_dense", "hunyuan_v1_moe", "ministral")},
    "nemotron": {"": {"num_key_value_heads": 48}},
    # the default layer_types is None: short-convolution and attention layers 3:1, as in the LFM2 checkpoints
    "lfm2_moe": {"": {"layer_types": ["full_attention" if i % 4 == 3 else "conv" for i in range(32)]}},
    # indexed-attention layers need the QSA indexer fields
    "qwen4_exp": {"text_config": _QSA},
    "qwen4_exp_text": {"": _QSA},
}


def default_config(model_type: str) -> Any:
    """The default config of ``model_type`` (as ``AutoConfig.for_model``), with :data:`DEFAULT_OVERRIDES` applied."""
    config_class = CONFIG_MAPPING[model_type]
    overrides = DEFAULT_OVERRIDES.get(model_type, {})
    specs = getattr(config_class, "sub_configs_defaults", None) or {}
    kwargs = dict(overrides.get("", {}))
    for sub, fields in overrides.items():
        if sub:
            kwargs[sub] = {**(getattr(specs.get(sub), "init_kwargs", None) or {}), **fields}
    return config_class(**kwargs)


def _prepare(model: torch.nn.Module, axis: str, strategies: dict[str, type]) -> Any:
    if axis == "TP":  # unmatched keys are the tiny check's business (its reason names them)
        return meshplan.prepare(model, tp_mesh(), strategy=strategies["TP"].name, strict=False)
    return meshplan.prepare(model, ep_mesh(), strategy=strategies["EP"].name, ep_size=EP_SIZE)


def measure(model_type: str, axis: str, strategies: dict[str, type]) -> dict[str, Any]:
    """Inside a fake world: ``sharded_fraction``, ``parameters`` and ``largest_replicated`` of ``model_type`` at its
    default size after its ``axis`` (``"TP"`` or ``"EP"``) plan, or the ``reason`` it could not be measured (the
    stage, e.g. ``config`` / ``build`` / ``TP refused`` / ``apply TP plan``, the exception type and message head).
    ``strategies`` maps each axis to its registered test strategy."""
    stage = "config"
    try:
        config = default_config(model_type)
        stage = "build"
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        stage = f"{axis} plan"
        prepared = _prepare(model, axis, strategies)
        stage = f"apply {axis} plan"
        prepared.apply()
    except (TensorParallelSizeError, ExpertParallelError) as exc:  # validation refuses this size
        return {"reason": failure_reason(f"{axis} refused", exc)}
    except Exception as exc:  # noqa: BLE001 - reported in the result
        return {"reason": failure_reason(stage, exc)}
    return {"sharded_fraction": sharded_fraction(model), "parameters": sum(p.numel() for p in model.parameters()),
            "largest_replicated": largest_replicated(model)}


def measure_all(tp_types: list[str], ep_types: list[str]) -> dict[str, dict[str, dict[str, Any]]]:
    """``{"TP": {type: result}, "EP": {type: result}}`` (see :func:`measure`), in a fake world of
    :data:`WORLD_SIZE` ranks that this call opens."""
    strategies = {"TP": TensorParallelOnly, "EP": ep_only_strategy()}
    found: dict[str, dict[str, dict[str, Any]]] = {axis: {} for axis in AXES}
    with fake_process_group(WORLD_SIZE):
        for strategy in strategies.values():
            meshplan.register_strategy(strategy)
        for axis, types in zip(AXES, (tp_types, ep_types)):
            for model_type in types:
                found[axis][model_type] = measure(model_type, axis, strategies)  # meta models: no memory to free
    return found


def _child(sender: Any, tp_types: list[str], ep_types: list[str]) -> None:
    logging.getLogger("meshplan").setLevel(logging.ERROR)  # strict=False names the unmatched keys of every type
    sender.send(measure_all(tp_types, ep_types))
    sender.close()


def measure_in_subprocess(tp_types: list[str], ep_types: list[str],
                          timeout: float = 300.0) -> dict[str, dict[str, dict[str, Any]]]:
    """:func:`measure_all` in one spawned process. Raises ``TimeoutError`` after ``timeout`` seconds, or
    ``RuntimeError`` if the process dies without a result (the child's stderr shows why)."""
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(sender, tp_types, ep_types), daemon=True)
    process.start()
    sender.close()
    try:
        if not receiver.poll(timeout):
            raise TimeoutError(f"the default-size measurement took over {timeout:.0f} s")
        try:
            return receiver.recv()
        except EOFError:
            process.join(5)
            raise RuntimeError(f"the default-size measurement process exited with code {process.exitcode} "
                               "without a result") from None
    finally:
        if process.is_alive():
            process.kill()
        process.join()
        receiver.close()
