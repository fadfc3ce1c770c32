"""The conformance sweep's sharded fraction at the default config size (``meshplan/conformance/default_size.py``: meta
device, fake 2-rank world) and the MoE summary ``bench/conformance.py`` renders from it."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

from meshplan.conformance.default_size import default_config, measure_all
from meshplan.plugins.testing import isolated_registry

BENCH = Path(__file__).resolve().parents[2] / "bench" / "conformance.py"


@pytest.fixture(scope="module")
def measured() -> dict[str, dict[str, dict[str, Any]]]:
    with isolated_registry():
        return measure_all(["mixtral", "gemma3n_text", "deepseek_v2", "dots1"], ["mixtral"])


def test_mixtral_is_sharded_almost_whole_by_tp_and_exactly_in_its_experts_by_ep(measured):
    tp, ep = measured["TP"]["mixtral"], measured["EP"]["mixtral"]
    assert tp["sharded_fraction"] >= 0.99, tp
    config = default_config("mixtral")
    experts = (config.num_hidden_layers * config.num_local_experts * 3 * config.hidden_size
               * config.intermediate_size)
    assert ep["parameters"] == tp["parameters"] == 46_702_792_704
    assert ep["sharded_fraction"] == pytest.approx(experts / ep["parameters"], rel=1e-12)  # 0.966


def test_a_plan_that_keeps_large_parts_whole_is_measured_at_its_real_share(measured):
    """The built-in Gemma 3n plan keeps the per-layer embedding table (34 % of the E4B-sized default) and the MLPs of
    the activation-sparse layers whole: about half of the model stays replicated (87 % sharded at tiny widths)."""
    found = measured["TP"]["gemma3n_text"]
    assert found["sharded_fraction"] == pytest.approx(0.4959, abs=0.001)
    name, share = found["largest_replicated"][0]
    assert name == "model.embed_tokens_per_layer.weight" and share == pytest.approx(0.3436, abs=0.001)


def test_refusals_and_fixed_defaults(measured):
    refused = measured["TP"]["deepseek_v2"]["reason"]
    assert refused.startswith("TP refused: TensorParallelSizeError") and "1407" in refused, refused
    assert measured["TP"]["dots1"]["sharded_fraction"] > 0.99  # builds only with DEFAULT_OVERRIDES' expert counts


def test_moe_summary_counts_the_bar_at_both_sizes():
    spec = importlib.util.spec_from_file_location("conformance_bench", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    passing = {"status": "pass", "reason": ""}
    results = [
        {**passing, "model_type": "a", "sharded_fraction": 0.95, "default_size": {"sharded_fraction": 0.999}},
        {**passing, "model_type": "b", "sharded_fraction": 0.85, "largest_replicated": [("x.weight", 0.1)],
         "default_size": {"sharded_fraction": 0.995}},
        {**passing, "model_type": "c", "sharded_fraction": 0.95,
         "default_size": {"reason": "TP refused: TensorParallelSizeError: 7 heads"}},
        {"model_type": "d", "status": "fail", "reason": "TP forward: boom", "default_size": {"reason": "x"}},
    ]
    text = "\n".join(bench.render_moe_summary(results, ["a", "b", "c", "d", "e"]))
    assert "2 at the tiny widths, 2 at the default size" in text
    assert "- b: 85.0% sharded, largest parts left whole: `x.weight` 10.0%" in text
    assert "- c: not measured: TP refused: TensorParallelSizeError: 7 heads" in text
    assert "- d: fails TP parity: TP forward: boom" in text and "- e: declares no TP plan" in text
