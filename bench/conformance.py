"""Conformance sweep: TP=2 forward + backward parity of every causal-LM model type that declares a transformers
TP plan, EP=2 parity of every one that declares an EP plan and (``--pp``) PP=2 parity of every one that declares a
PP plan, on 2 gloo ranks (CPU), against the same model in one process.

    .venv/bin/python bench/conformance.py --output docs/conformance.md --json conformance.json --pp
    .venv/bin/python bench/conformance.py --only llama,mixtral

Every model type is one task on the same two rank processes (a ``RankPool``), so imports and the process group
are paid once. A task that times out, or leaves the ranks in disagreement, restarts the pool and the sweep
goes on. The per-architecture check lives in ``meshplan/conformance/check.py`` (the CI subset test uses it too).
Then one more process measures the sharded fraction of every type at its default config's size on the meta device
(``meshplan/conformance/default_size.py``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # a checkout without an install: spawned ranks inherit sys.path (meshplan)

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

WORLD_SIZE = 2
#: Issue 10's bar: a MoE type counts when it passes TP=2 parity with at least this fraction of elements sharded.
MOE_SHARDED_TARGET = 0.9
#: Seconds the default-size measurement of the whole list may take.
DEFAULT_SIZE_TIMEOUT = 600.0

#: Known failure causes: (title, explanation, predicate on a failed result). A failure may show several.
CAUSES: list[tuple[str, str, Any]] = [
    ("Keys of the transformers plan that match no module (strict validation)",
     "The transformers plans of these classes list keys for every variant of the architecture (a dense "
     "`mlp.gate_proj` next to MoE experts, optional experts / per-layer embeddings / `q_proj` of the no-q-LoRA "
     "variant); a given config builds one variant, so some keys match nothing, and the fallback hands them to "
     "strict validation (the default), which refuses the plan. transformers only warns about such keys. The same "
     "keys are unmatched with the full-size default config (checked on the meta device), so this is not an "
     "artifact of the tiny configs. Llama 4 additionally carries transformers' own instance `_tp_plan` entries "
     "without the `model.` prefix. The reason says what happens with `strict=False`.",
     lambda r: "UnmatchedPlanKeyError (strict)" in r["reason"]),
    ("`mla_kv_a_proj` is not translated (multi-head latent attention)",
     "The fallback refuses the plan (`UntranslatableStyleError`) because `kv_a_proj_with_mqa: mla_kv_a_proj` has no "
     "torch style. The style only all-reduces, in backward, the gradient of the rotary slice "
     "(`qk_rope_head_dim` last features) of the projection's output, which bypasses the column-wise `kv_b_proj`; "
     "a forward hook with an identity/all-reduce-backward function on that slice expresses it. Verified with "
     "such a style: axk2, deepseek_v32, dots3_note, dots3_note_text, glm4_moe_lite, glm_moe_dsa and longcat_flash "
     "pass; deepseek_v2 and minicpm3 then hit the unmatched-key cause (`self_attn.q_proj` of the no-q-LoRA "
     "variant) and pass with `strict=False`; hy_v4 then fails on its attention sinks (the per-head cause).",
     lambda r: "mla_kv_a_proj" in r["reason"]),
    ("Per-head parameters stay replicated while the heads are sharded",
     "The transformers plan marks the attention module `local_params` and shards per-head parameters by name "
     "(`self_attn.sinks: colwise`, Beam's `self_attn.gate_bias: colwise`); the fallback leaves parameter-level "
     "entries replicated (\"names a parameter\"), which is only safe when the whole module stays replicated. "
     "Here q/k/v are column-wise, so the module sees its local heads next to all heads' sinks and the forward "
     "fails on the shape. Doge is the same kind of problem: its per-head `A` and the row-wise `dt_proj` output "
     "build a dynamic mask for all heads. Sharding the named parameters along dim 0 and computing on the local "
     "shard makes granite_swa, granitemoe_swa, mimo_v2_flash and beam pass (verified).",
     lambda r: "TP forward" in r["reason"] and any(s in r.get("traceback", "") for s in (
         "sinks", "gate_bias", "attention_mask"))),
    ("Replicated parameters inside a TP region get partial gradients",
     "A module with parameters that the plan does not name, running on column-sharded activations, computes its "
     "parameter gradient from this rank's features only: Apertus' xIELU activation (`mlp.act_fn.alpha_p/alpha_n`, "
     "after the column-wise `up_proj`) and Sarvam-MoE's per-head `q_norm`/`k_norm` (`use_qk_norm`, not in the "
     "Glm4Moe plan it reuses). The error of ~1 is the missing other rank's half. Adding these modules as "
     "`replicated_with_grad_allreduce` makes all three pass (verified).",
     lambda r: re.search(r"grad \S+\.(act_fn|q_norm|k_norm)\.", r["reason"]) is not None
     and r.get("grad_error", 0.0) > 0.1),
    ("Float32 rounding of an ill-conditioned gradient (Lara)",
     "Lara-Mini's `linear_attn.A_log` gradient goes through the gated delta rule's recurrence. In float64, TP=2 "
     "matches one process exactly (that gradient's error is 0, logits 3e-16); in float32 the one-process gradient "
     "is itself 2.4e-5 from the float64 one and TP=2's 4.5e-5 on the other side, so the two float32 runs differ "
     "by ~7e-5 with nothing left partial (`tests/plans/test_linear_attention.py` checks it at 2e-4).",
     lambda r: "linear_attn.A_log" in r["reason"]),
    ("In-place update of a TP output",
     "Llama 4's MoE adds the routed output in place (`out.add_(...)`) to the shared expert's output, which is the "
     "local view `RowwiseParallel` returns (`to_local()`), and autograd forbids in-place updates of that view.",
     lambda r: "modified inplace" in r["reason"]),
    ("The sharded embedding weight is read directly",
     "Gemma 4's multimodal forward indexes `embed_tokens.weight[pad_token_id]` outside the embedding's forward; "
     "with a vocab-parallel embedding that weight is a DTensor and `torch.where` mixes it with plain tensors.",
     lambda r: "mixed torch.Tensor and DTensor" in r["reason"]),
    ("Vocab-parallel style on an embedding container",
     "Inkling's plan names `model.embed_tokens: embedding_rowwise`, but that module is an embedding plus a norm "
     "(`InklingNormedEmbedding`); torch's `RowwiseParallel` re-registers every nested parameter on the module "
     "and fails on the dotted name.",
     lambda r: "parameter name can" in r["reason"]),
    ("Per-head norm gradients at the tolerance (Gemma 3n)",
     "The built-in Gemma 3n plan (`meshplan.plans.gemma3n`) keeps the MLPs of activation-sparse layers whole (their "
     "threshold uses statistics over all intermediate features); logits then match to ~1e-6, and the one gradient "
     "over 1e-5 is a per-head `k_norm` whose TP-summed gradient rounds to ~1e-5 (6e-6 with sparsity off).",
     lambda r: r["model_type"].startswith("gemma3n") and "k_norm" in r["reason"]),
    ("Optional dependency missing",
     "Gemma3nForConditionalGeneration builds its vision tower through timm (and Pillow), which are not installed "
     "here; the language model is covered by `gemma3n_text`.",
     lambda r: "ImportError" in r["reason"]),
    ("Not a standalone language model",
     "The Gemma 4 assistant (drafter) models take the target model's hidden states (`inputs_embeds`) and "
     "`shared_kv_states` and cannot run from token ids alone, so the check has no reference to compare with.",
     lambda r: "shared_kv_states cannot be None" in r["reason"]),
]


#: Known causes of PP=2 failures, as :data:`CAUSES`.
PP_CAUSES: list[tuple[str, str, Any]] = [
    ("Parameters outside the modules of the pp plan (refused before any collective)",
     "transformers' `base_model_pp_plan` names the embeddings, the blocks and the final norm, but these models "
     "have more modules at that level, and meshplan refuses to guess their stage (`PipelineSplitError`): Gemma 3n "
     "and Gemma 4 compute per-layer inputs from the token ids before the blocks (`embed_tokens_per_layer`, "
     "`per_layer_model_projection`) that every block reads, so they would have to travel with the hidden states; "
     "Phi-4-multimodal embeds images and audio in `embed_tokens_extend`; HY-V4 collapses its hyper-connection "
     "streams in `hc_head` after the last block, and its shared DSA layers need top-k indices from an earlier "
     "layer, which a later stage does not have. A plan provider's `pp` entry places such modules where the "
     "model's forward uses them: meshplan's DeepSeek-V4 plan puts its `hc_head` on the last stage.",
     lambda r: "places no stage for parameters" in r["reason"]),
    ("The pp plan names modules the model lacks",
     "HRM's config declares the Llama-style plan (`layers`, `norm`) but the model has a hierarchical H/L "
     "module structure.",
     lambda r: "names modules" in r["reason"] and "lacks" in r["reason"]),
    ("Optional dependency missing",
     "Gemma3nForConditionalGeneration builds its vision tower through timm (and Pillow), which are not installed "
     "here.",
     lambda r: "ImportError" in r["reason"]),
]


def group_failures(results: list[dict[str, Any]], causes: list[tuple[str, str, Any]] | None = None
                   ) -> list[tuple[str, str, list[str]]]:
    """``(title, explanation, model types)`` per known cause (default: the TP causes), plus one group for failures
    that match none."""
    causes = CAUSES if causes is None else causes
    failed = [r for r in results if r["status"] != "pass"]
    groups = [(title, text, [r["model_type"] for r in failed if test(r)]) for title, text, test in causes]
    unknown = [r["model_type"] for r in failed if not any(test(r) for _, _, test in causes)]
    if unknown:
        groups.append(("Other", "See the reason column.", unknown))
    return [g for g in groups if g[2]]


def failure_cause(result: dict[str, Any]) -> str:
    """The title of the first known cause a failed result shows, else the head of its reason."""
    return next((title for title, _, test in CAUSES if test(result)), _short(result["reason"]))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="comma-separated model types to check (default: every type with a TP plan)")
    parser.add_argument("--limit", type=int, help="check only the first N model types")
    parser.add_argument("--output", type=Path, help="write the markdown report here (e.g. docs/conformance.md)")
    parser.add_argument("--json", type=Path, help="write the per-type results as JSON here")
    parser.add_argument("--no-ep", action="store_true",
                        help="skip the EP=2 sweep of the model types that declare base_model_ep_plan")
    parser.add_argument("--pp", action="store_true",
                        help="also run the PP=2 sweep of the model types that declare base_model_pp_plan (long)")
    parser.add_argument("--no-default-size", action="store_true",
                        help="skip the sharded fraction at each type's default config size (meta device)")
    parser.add_argument("--timeout", type=float, default=240.0,
                        help="seconds one model type may take before the ranks are restarted (default 240)")
    return parser.parse_args(argv)


def enumeration() -> dict[str, Any]:
    """How many causal-LM model types declare a TP plan, and where."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from meshplan.conformance.check import plan_declaration
    from meshplan.conformance.expert_check import model_types_with_ep_plan

    where = {t: plan_declaration(t) for t in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES}
    return {"causal_lm_types": len(where), "types": [t for t, w in where.items() if w],
            "ep_types": model_types_with_ep_plan(),
            "config": sum(w == "config" for w in where.values()),
            "class_only": [t for t, w in where.items() if w == "class"],
            "meshplan_only": [t for t, w in where.items() if w == "meshplan"]}


def select_types(args: argparse.Namespace, found: dict[str, Any], key: str = "types") -> list[str]:
    types = found[key]
    if args.only:
        wanted = [t.strip() for t in args.only.split(",") if t.strip()]
        if key == "types":
            unknown = [t for t in wanted if t not in types]
            if unknown and not set(unknown) <= set(found.get("ep_types", ())):
                raise SystemExit(f"not causal-LM model types with a TP or EP plan: {unknown}")
        types = [t for t in wanted if t in types]
    return types[:args.limit] if args.limit else types


def _failure(model_type: str, reason: str, seconds: float) -> dict[str, Any]:
    return {"model_type": model_type, "status": "fail", "reason": reason, "stage": "harness", "seconds": seconds}


def run_sweep(types: list[str], timeout: float, log=print, check=None) -> list[dict[str, Any]]:
    """Check each model type on one persistent 2-rank pool; a hang or a crash restarts the pool. ``check`` is the
    per-type rank function (default: the TP=2 check)."""
    from meshplan.conformance.check import check_architecture, merge_rank_results
    from meshplan.plugins.testing import RankError, RankPool

    check = check or check_architecture

    pool = RankPool(WORLD_SIZE)
    results = []
    try:
        for index, model_type in enumerate(types, 1):
            if not pool.alive:
                pool.close(force=True)
                pool = RankPool(WORLD_SIZE)
            start = time.perf_counter()
            restart = False
            try:
                result = merge_rank_results(pool.run(check, model_type, timeout=timeout))
                restart = result["reason"].startswith("ranks disagree") or result.pop("restart_pool", False)
            except TimeoutError:
                result = _failure(model_type, f"harness: timed out after {timeout:.0f} s (ranks restarted)",
                                  time.perf_counter() - start)
                restart = True
            except RankError as exc:
                head = " ".join(str(exc).split("\n---")[0].split())[:240]
                result = _failure(model_type, f"harness: {head}", time.perf_counter() - start)
                restart = True
            result.pop("traceback", None) if result["status"] == "pass" else None
            results.append(result)
            log(f"[{index}/{len(types)}] {model_type:28s} {result['status']:4s} {result['seconds']:6.1f}s  "
                f"{result['reason']}", flush=True)
            if restart and index < len(types):
                pool.close(force=True)
                pool = RankPool(WORLD_SIZE)
    finally:
        pool.close(force=not pool.alive)
    return results


def attach_default_size(results: list[dict[str, Any]], ep_results: list[dict[str, Any]], log=print) -> None:
    """Adds ``default_size`` to every TP and EP result: its sharded fraction at the default config's size (see
    ``meshplan/conformance/default_size.py``), or the ``reason`` it could not be measured."""
    from meshplan.conformance.default_size import measure_in_subprocess

    start = time.perf_counter()
    missing: dict[str, Any] = {"reason": "harness: not measured"}
    try:
        found = measure_in_subprocess([r["model_type"] for r in results], [r["model_type"] for r in ep_results],
                                      DEFAULT_SIZE_TIMEOUT)
    except (TimeoutError, RuntimeError) as exc:
        found, missing = {}, {"reason": f"harness: {exc}"}
    for axis, rows in (("TP", results), ("EP", ep_results)):
        for r in rows:
            r["default_size"] = found.get(axis, {}).get(r["model_type"], missing)
            log(f"[default size] {axis} {r['model_type']:28s} {_default_cell(r)}", flush=True)
    log(f"default size: measured in {time.perf_counter() - start:.0f} s", flush=True)


def machine_description() -> str:
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{os.cpu_count()} CPU cores ({cpu}), {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}")


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _short(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[:limit - 3].rstrip() + "..."


def _percent(fraction: float) -> str:
    """``fraction`` as a percentage rounded down to 0.1, so that only a fully sharded model shows 100.0%."""
    return f"{math.floor(fraction * 1000) / 10:.1f}%"


def _default_cell(result: dict[str, Any]) -> str:
    """The sharded fraction at the default size, or ``n/a (stage)`` (the reason is listed under the table)."""
    found = result.get("default_size")
    if found is None:
        return ""
    if "sharded_fraction" in found:
        return _percent(found["sharded_fraction"])
    return f"n/a ({found['reason'].split(':')[0]})"


def _details(result: dict[str, Any]) -> str:
    if result["status"] == "pass":
        return (f"logits {result.get('logits_error', 0):.1e}, grads {result.get('grad_error', 0):.1e} "
                f"(max rel. error)")
    return result["reason"]


def _source(result: dict[str, Any]) -> str:
    source = result.get("plan_source") or ""
    if not source:
        return ""
    return "built-in" if "meshplan.plans.hf" not in source else "HF fallback"


def _tiny_cell(result: dict[str, Any]) -> str:
    return f"{result['sharded_fraction']:.0%}" if "sharded_fraction" in result else ""


def _ep_cells(result: dict[str, Any] | None) -> tuple[str, str, str]:
    """(EP=2 result, EP sharded fraction tiny, at the default size) cells of the main table."""
    if result is None:
        return "", "", ""
    return result["status"], _tiny_cell(result), _default_cell(result)


def _unmeasured(results: list[dict[str, Any]], axis: str) -> list[str]:
    """Bullets naming the types whose default size could not be measured, and why."""
    lines = [f"- {r['model_type']}: {_cell(r['default_size']['reason'])}" for r in results
             if "reason" in r.get("default_size", {})]
    if not lines:
        return []
    return [f"Not measured at the default size ({axis}, {len(lines)}):", "", *lines, ""]


def render_ep_section(ep_results: list[dict[str, Any]], meta: dict[str, Any]) -> list[str]:
    """The EP=2 section: every causal-LM type that declares ``base_model_ep_plan``."""
    passed = [r for r in ep_results if r["status"] == "pass"]
    shares = sorted(r["sharded_fraction"] for r in passed if "sharded_fraction" in r)
    spread = (f"the experts are {shares[0]:.0%}–{shares[-1]:.0%} of the tiny models' parameter elements "
              f"(median {shares[len(shares) // 2]:.0%}; tiny vocabularies and 4 experts make them a smaller share "
              "than at full size)") if shares else "no type passed"
    lines = [
        "## EP=2",
        "",
        f"Every causal-LM model type whose config (or a sub-config) declares `base_model_ep_plan` "
        f"({len(ep_results)} types; `meshplan/conformance/expert_check.py`), with the same tiny config, batch, "
        "loss and "
        "tolerances as above (Gemma 4 switched to its MoE variant, ZAYA to top-1 routing, which its config "
        "requires), run once unsharded and once with expert parallelism of size 2 on 2 gloo ranks: "
        "`meshplan.prepare(model, mesh, ep_size=2)` with a test-only strategy that applies only the EP plan "
        "it resolves and validates (the Hugging Face fallback reads `base_model_ep_plan`: `ep_dispatch_experts` "
        "modules, `grouped_gemm` parameters). Both ranks hold the same batch and each sends half of its tokens "
        "to the experts' owners by all-to-all; every expert lives on one rank. `sharded` is the fraction of "
        "parameter elements split over the ranks (the experts: EP alone shards nothing else), in the tiny model "
        "and at the default size (measured as for TP, with EP=2 on the fake 2-rank world; Gemma 4's default "
        "config is its dense variant).",
        "",
        "| model type | EP=2 | reason | sharded (tiny) | sharded (default size) | seconds |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in ep_results:
        lines.append(f"| {r['model_type']} | {r['status']} | {_cell(_details(r))} | {_tiny_cell(r)} | "
                     f"{_default_cell(r)} | {r.get('seconds', 0):.1f} |")
    lines += [
        "",
        f"**Totals:** {len(passed)} pass, {len(ep_results) - len(passed)} fail of {len(ep_results)} model types "
        f"({len(passed) / max(len(ep_results), 1):.1%} pass); {spread}.",
        "",
        *_unmeasured(ep_results, "EP"),
    ]
    return lines


def _error_cell(result: dict[str, Any], key: str) -> str:
    return f"{result[key]:.1e}" if key in result else ""


def render_pp_section(pp_results: list[dict[str, Any]]) -> list[str]:
    """The PP=2 section (empty without ``--pp``): every causal-LM type that declares ``base_model_pp_plan``."""
    if not pp_results:
        return []
    passed = sum(r["status"] == "pass" for r in pp_results)
    lines = ["## PP=2", "",
             f"**{passed}/{len(pp_results)} pass ({passed / len(pp_results):.1%}).** Every causal-LM type whose config "
             "(or text config) declares `base_model_pp_plan` (`meshplan/conformance/pipeline_check.py`): the tiny "
             "config above with `tie_word_embeddings=False`, `meshplan.parallelize` on a pp=2 x dp_shard=1 mesh "
             "(2 gloo ranks), 1F1B over 2 microbatches (`pipe.step`). A type passes when the loss and every "
             "gradient of each rank's stage match one process running the same 2 microbatches with gradient "
             "accumulation within the TP tolerance above (`vs microbatched`), and that process is within 1e-3 "
             "of one process on the whole batch. `vs whole batch` is the pipeline's error against the whole "
             "batch: splitting the batch alone moves a scalar parameter's float32 gradient sum by up to ~2e-5 "
             "in some models (Lara's `A_log`, Inkling's router `global_scale`), the same with or without a "
             "pipeline (the pipeline's own error is 0 on every type that runs).", "",
             "| model type | PP=2 | vs microbatched | vs whole batch | reason | seconds |",
             "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['model_type']} | {r['status']} | {_error_cell(r, 'max_error')} | "
              f"{_error_cell(r, 'whole_batch_error')} | {_cell(_short(r['reason']))} | {r['seconds']:.1f} |"
              for r in pp_results]
    groups = group_failures(pp_results, PP_CAUSES)
    if groups:
        lines += ["", "PP=2 failure causes:", ""]
        lines += [f"- **{title}** ({len(types)}: {', '.join(types)}). {text}" for title, text, types in groups]
    return [*lines, ""]


def _largest(found: dict[str, Any]) -> str:
    return ", ".join(f"`{name}` {share:.1%}" for name, share in found.get("largest_replicated", ())[:2])


def moe_shortfall(result: dict[str, Any] | None, at_default_size: bool) -> str | None:
    """Why a MoE type misses :data:`MOE_SHARDED_TARGET` (TP parity with that fraction sharded) at the tiny widths or
    at the default size, or ``None`` when it meets it."""
    if result is None:
        return "declares no TP plan"
    if result["status"] != "pass":
        return f"fails TP parity: {failure_cause(result)}"
    found = result.get("default_size", {"reason": "not measured"}) if at_default_size else result
    if "sharded_fraction" not in found:
        return f"not measured: {_short(found['reason'])}"
    if found["sharded_fraction"] < MOE_SHARDED_TARGET:
        return f"{_percent(found['sharded_fraction'])} sharded, largest parts left whole: {_largest(found)}"
    return None


def render_moe_summary(results: list[dict[str, Any]], moe_types: list[str]) -> list[str]:
    """How many MoE types (those declaring ``base_model_ep_plan``) meet issue 10's bar at the tiny widths and at
    the default size, and why the others do not."""
    by_type = {r["model_type"]: r for r in results}
    sizes = [("the tiny widths", False)]
    if any("default_size" in r for r in results):
        sizes.append(("the default size", True))
    misses = {label: {t: why for t in moe_types if (why := moe_shortfall(by_type.get(t), default)) is not None}
              for label, default in sizes}
    counts = ", ".join(f"{len(moe_types) - len(missed)} at {label}" for label, missed in misses.items())
    lines = [
        "## MoE types",
        "",
        f"Of the {len(moe_types)} model types that declare `base_model_ep_plan`, the number that pass TP=2 parity "
        f"with at least {MOE_SHARDED_TARGET:.0%} of parameter elements sharded: {counts} (parity is checked at "
        "the tiny widths only; the default size changes the sharded fraction).",
        "",
    ]
    for label, missed in misses.items():
        lines += [f"Not at {label} ({len(missed)}):", "", *(f"- {t}: {_cell(why)}" for t, why in missed.items()), ""]
    return lines


def render_markdown(results: list[dict[str, Any]], meta: dict[str, Any],
                    ep_results: list[dict[str, Any]] | None = None,
                    pp_results: list[dict[str, Any]] | None = None) -> str:
    passed = sum(r["status"] == "pass" for r in results)
    ep_by_type = {r["model_type"]: r for r in ep_results or ()}
    found = meta["enumeration"]
    lines = [
        "# TP plan conformance sweep",
        "",
        f"Every causal-LM model type of the installed transformers that has a TP plan "
        f"(`MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`: {found['with_plan']} of {found['causal_lm_types']} types, "
        f"{found['config']} through `base_model_tp_plan` on the config or a sub-config and "
        f"{len(found['class_only'])} only through the model class's `_tp_plan`: "
        f"{', '.join(found['class_only']) or 'none'}; plus {len(found.get('meshplan_only', ()))} without a "
        f"transformers plan that a built-in meshplan plan serves: {', '.join(found.get('meshplan_only', ())) or 'none'}"
        ") is built from a tiny config "
        "with random weights and run once unsharded and once with tensor parallelism of size 2 on 2 gloo ranks "
        "(CPU, fp32), with the plan `meshplan.parallelize` resolves and validates (a test-only strategy that "
        "applies only TP). A model type passes when the logits and every gathered parameter gradient match the "
        f"single-process reference within {meta['rtol']:g} relative to the reference tensor's max |value| "
        f"(gradients: to max(own max |g|, {meta['grad_floor']:g} x the model's largest |g|), since some are "
        "analytically zero and then only rounding noise). "
        "Tiny configs (`meshplan/conformance/check.py`): one layer of each distinct layer kind (at least 2, "
        "at most 4), hidden size 64, 4 attention heads and 2 KV heads (4 with multi-head latent attention), head "
        "dim 16, vocabulary 256, 4 experts with top-2 routing, sliding windows of 8, LoRA ranks 32, dropout 0, "
        "vision/audio towers shrunk too; `OVERRIDES` there fixes the few default configs that do not build. Input: "
        "2 x 16 random token ids; loss: cross-entropy of the logits against random labels; weights: the model's "
        "initialization (seed 0) plus 0.05 x N(0, 1) noise on every parameter, so norm weights are not all ones. "
        "`plan` is the provider `meshplan.parallelize` resolved (a built-in one or the Hugging Face fallback, "
        "which translates the model's own transformers plan).",
        "",
        "Two `sharded` columns give the fraction of parameter elements that the plan splits over the ranks. "
        "`sharded (tiny)` is measured on the tiny model above, the one whose numbers are checked. Its shares are "
        "not those of a real model: small parts that every plan keeps whole (routers, norms, the down-projections "
        "of multi-head latent attention) weigh far more at hidden size 64, and 4 small experts far less than "
        "the hundreds of a real MoE. `sharded (default size)` applies the same plan (with `strict=False`) to the "
        "model built from the type's default config, which is mostly the shape of its flagship checkpoint, on the "
        "meta device (no weights, no downloads, nothing computed) in a fake 2-rank world "
        "(`meshplan/conformance/default_size.py`; `DEFAULT_OVERRIDES` there fixes the few default configs that do "
        "not build). `n/a` names the stage that stopped it (`TP refused`: the plan's validation refuses TP=2 "
        "at that size, e.g. a head or expert width that 2 does not divide); the reasons are listed under the "
        "table. Where only the embedding and `lm_head` are sharded, the transformers plan shards nothing else.",
        "",
        "| model type | result | reason | plan | sharded (tiny) | sharded (default size) | seconds | EP=2 | "
        "EP sharded (tiny) | EP sharded (default size) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        ep_status, ep_tiny, ep_default = _ep_cells(ep_by_type.get(r["model_type"]))
        lines.append(f"| {r['model_type']} | {r['status']} | {_cell(_details(r))} | {_source(r)} | "
                     f"{_tiny_cell(r)} | {_default_cell(r)} | {r.get('seconds', 0):.1f} | {ep_status} | "
                     f"{ep_tiny} | {ep_default} |")
    lines += [
        "",
        f"**Totals:** {passed} pass, {len(results) - passed} fail of {len(results)} model types "
        f"({passed / max(len(results), 1):.1%} pass).",
        "",
        *_unmeasured(results, "TP"),
    ]
    groups = group_failures(results)
    if groups:
        lines += ["## Failure causes", ""]
        for title, text, types in groups:
            lines += [f"- **{title}** ({len(types)}: {', '.join(types)}). {text}", ""]
    if ep_results:
        lines += render_ep_section(ep_results, meta)
    if meta.get("moe_types"):
        lines += render_moe_summary(results, meta["moe_types"])
    lines += render_pp_section(pp_results or [])
    lines += [
        f"- Date: {meta['date']}",
        f"- Machine: {meta['machine']}; load average {meta['load_before']} before, {meta['load_after']} after "
        "(the machine is shared, so times vary)",
        f"- Wall time: {meta['wall_seconds']:.0f} s for the whole sweep",
        f"- Command: `{meta['command']}`",
        "",
    ]
    return "\n".join(lines)


def _load() -> str:
    try:
        return " / ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from meshplan.conformance.check import GRAD_FLOOR, RTOL

    found = enumeration()
    types = select_types(args, found)
    print(f"checking {len(types)} model types on {WORLD_SIZE} gloo ranks", flush=True)
    load_before, start = _load(), time.perf_counter()
    results = run_sweep(types, args.timeout)
    ep_types = select_types(args, found, "ep_types")
    ep_results: list[dict[str, Any]] = []
    if not args.no_ep:
        from meshplan.conformance.expert_check import check_architecture_ep

        print(f"checking {len(ep_types)} model types with an EP plan at EP=2", flush=True)
        ep_results = run_sweep(ep_types, args.timeout, check=check_architecture_ep)
    pp_results: list[dict[str, Any]] = []
    if args.pp:
        from meshplan.conformance.pipeline_check import check_architecture_pp, model_types_with_pp_plan

        pp_types = select_types(args, {"pp_types": model_types_with_pp_plan()}, "pp_types")
        print(f"checking {len(pp_types)} model types with a PP plan at PP=2", flush=True)
        pp_results = run_sweep(pp_types, args.timeout, check=check_architecture_pp)
    if not args.no_default_size:
        attach_default_size(results, ep_results)
    wall = time.perf_counter() - start
    meta = {
        "date": datetime.date.today().isoformat(), "machine": machine_description(), "load_before": load_before,
        "load_after": _load(), "wall_seconds": wall, "rtol": RTOL, "grad_floor": GRAD_FLOOR, "enumeration": {
            k: v for k, v in found.items() if k not in ("types", "ep_types")}
        | {"with_plan": len(found["types"]), "with_ep_plan": len(found["ep_types"])}, "moe_types": ep_types,
        "command": " ".join(shlex.quote(a) for a in [".venv/bin/python", "bench/conformance.py",
                                                      *(sys.argv[1:] if argv is None else argv)]),
    }
    passed = sum(r["status"] == "pass" for r in results)
    ep_passed = sum(r["status"] == "pass" for r in ep_results)
    pp_passed = sum(r["status"] == "pass" for r in pp_results)
    print(f"{passed}/{len(results)} pass (TP=2), {ep_passed}/{len(ep_results)} pass (EP=2), "
          f"{pp_passed}/{len(pp_results)} pass (PP=2) in {wall:.0f} s", flush=True)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(render_markdown(results, meta, ep_results, pp_results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "results": results, "ep_results": ep_results,
                                         "pp_results": pp_results}, indent=1,
                                        default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
