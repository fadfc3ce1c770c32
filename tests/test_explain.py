"""``meshplan explain``: the real parallelize path on the meta device with a fake world."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
from torch.distributed.device_mesh import init_device_mesh

import meshplan
from meshplan.cli.main import main
from meshplan.cli.meshspec import parse_mesh_spec
from meshplan.cli.modelsource import ModelSourceError, build_model, resolve_source
from meshplan.core.errors import MeshError, TensorParallelSizeError
from meshplan.dryrun import explain, render_text
from meshplan.dryrun.name_summary import expand_pattern, summarize_names


def ceil(n: int, k: int) -> int:
    """Rows of the first chunk when torch (and FSDP2) splits n rows into k chunks."""
    return -(-n // k)


def llama_rank0_elements(h: int, inter: int, layers: int, heads: int, kv: int, vocab: int, tp: int, dp: int) -> int:
    """Hand-written layout: TP shards dim 0 (colwise, embedding) or dim 1 (rowwise); FSDP2 then cuts dim 0."""
    hd = h // heads
    col = lambda out, inp: ceil(ceil(out, tp), dp) * inp  # noqa: E731
    row = lambda out, inp: ceil(out, dp) * ceil(inp, tp)  # noqa: E731
    norm = ceil(h, dp)
    layer = col(heads * hd, h) + 2 * col(kv * hd, h) + row(h, heads * hd) + 2 * col(inter, h) + row(h, inter)
    return 2 * col(vocab, h) + norm + layers * (layer + 2 * norm)


@pytest.fixture(scope="module")
def llama8b_report():
    return explain("llama3-8b", "dp_replicate=2,dp_shard=4,tp=8")


def test_llama3_8b_on_64_ranks_matches_hand_written_layout(llama8b_report):
    report = llama8b_report
    expected = llama_rank0_elements(4096, 14336, 32, 32, 8, 128256, tp=8, dp=4)
    mem = report["memory"]
    assert mem["parameters"]["total"] == 8_030_261_248
    assert mem["parameters"]["local"] == expected == 251_003_904
    assert mem["parameters"]["shards"] == 32  # dp_shard x tp; the 2 replicas do not divide memory
    assert mem["parameters"]["ideal_local"] == pytest.approx(8_030_261_248 / 32)
    # fp32 master weights (bf16-mixed): 4 bytes each for params and grads, two fp32 moments + a step for AdamW
    assert mem["bytes"]["params"]["local"] == mem["bytes"]["grads"]["local"] == 4 * expected
    tensors = 2 + 1 + 32 * 9
    assert mem["bytes"]["adamw"]["local"] == 8 * expected + 4 * tensors
    assert mem["transient"]["compute_dtype"] == "bfloat16"


def test_report_sections(llama8b_report):
    report = llama8b_report
    assert report["schema"] == "meshplan.explain/1" and report["error"] is None
    assert report["mesh"]["world_size"] == 64 and report["mesh"]["coordinate"] == {
        "dp_replicate": 0, "dp_shard": 0, "tp": 0}
    assert report["strategy"]["name"] == "fsdp2" and "meshplan.strategies.fsdp2" in report["strategy"]["provenance"]
    plan = report["plan"]
    assert plan["tp_size"] == 8 and "LlamaForCausalLM" in plan["source"]
    q = next(e for e in plan["entries"] if e["key"].endswith("q_proj"))
    assert q["count"] == 32 and q["modules"] == [{"pattern": "model.layers.{0..31}.self_attn.q_proj", "count": 32}]
    assert q["style"].startswith("ColwiseParallel")
    assert plan["replicated_linears"]["count"] == 0
    units = report["fsdp_units"]
    assert sum(u["count"] for u in units) == 33  # 32 decoder layers + the root
    layers = [u for u in units if u["modules"].startswith("model.layers")]
    assert {u["class"] for u in layers} == {"LlamaDecoderLayer"}
    text = render_text(report)
    for needle in ("strategy  fsdp2", "model.layers.{0..31}.self_attn.q_proj (32)", "FSDP units (33)",
                   "total / 32 shards", "AdamW state"):
        assert needle in text
    json.dumps(report)  # JSON-ready as it is


def test_validation_errors_are_the_ones_a_real_run_raises(fake_pg):
    report = explain("mistral-7b", "dp_shard=4,tp=3", raise_errors=False)
    error = report["error"]
    assert error["phase"] == "prepare" and error["type"] == "TensorParallelSizeError" and error["exit_code"] == 2
    # the same call, by hand, as a training script would make it
    model = build_model(resolve_source("mistral-7b"))
    with fake_pg(12):
        mesh = init_device_mesh("cpu", (4, 3), mesh_dim_names=("dp_shard", "tp"))
        with pytest.raises(TensorParallelSizeError) as info:
            meshplan.parallelize(model, mesh, dp_shard_cp_mesh_name="dp_shard")
    assert str(info.value) == error["message"]
    with pytest.raises(TensorParallelSizeError):
        explain("mistral-7b", "dp_shard=4,tp=3")


def test_unmatched_plan_key_and_unknown_option_fail_before_apply():
    report = explain("llama", "dp_shard=2,tp=2", tp_plan={"model.layers.*.mlp.nope": "colwise"},
                     overrides={"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128,
                                "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256},
                     raise_errors=False)
    assert report["error"]["type"] == "UnmatchedPlanKeyError" and "nope" in report["error"]["message"]
    report = explain("tiny-llama", "dp_shard=2", options={"reshard_after_foward": False}, raise_errors=False)
    assert report["error"]["type"] == "OptionsError" and "reshard_after_forward" in report["error"]["message"]


@dataclass
class SeenOptions(meshplan.StrategyOptions):
    dp_mesh_name: str = "dp"
    dp_shard_cp_mesh_name: str = "dp_shard_cp"


class SeeingStrategy(meshplan.Strategy):
    name = "seeing"
    options_class = SeenOptions

    def parallelize(self, model, roles, plan, options):
        return model


@pytest.mark.parametrize("strategy, mesh, roles", [
    ("fsdp2", "dp_replicate=2,dp_shard=2,cp=2,tp=2",
     {"tp": (["tp"], 2), "cp": (["cp"], 2), "dp_replicate": (["dp_replicate"], 2), "dp_shard": (["dp_shard"], 2)}),
    ("ddp", "dp_replicate=2,dp_shard=2,tp=2", {"tp": (["tp"], 2), "dp_replicate": (["dp_replicate", "dp_shard"], 4)}),
])
def test_explain_reports_the_roles_each_strategy_resolves(strategy, mesh, roles):
    report = explain("tiny-llama", mesh, strategy=strategy)
    assert {r: (v["dims"], v["size"]) for r, v in report["mesh"]["roles"].items()} == roles


def test_explain_with_a_runtime_strategy_and_no_fsdp_units():
    meshplan.register_strategy(SeeingStrategy)
    report = explain("tiny-llama", "dp_replicate=2,dp_shard=2", strategy="seeing")
    assert report["strategy"]["provenance"].startswith("runtime")
    assert report["strategy"]["options"]["dp_mesh_name"] == "'dp'"
    assert report["fsdp_units"] == [] and report["memory"]["parameters"]["shards"] == 1
    assert any("no FSDP units" in note for note in report["notes"])


def test_mesh_spec_errors():
    assert parse_mesh_spec("dp_replicate=8, dp_shard=256,tp=8") == {"dp_replicate": 8, "dp_shard": 256, "tp": 8}
    for bad in ("dp=0", "dp", "dp=2,dp=2", "tp=x"):
        with pytest.raises(MeshError):
            parse_mesh_spec(bad)


@pytest.mark.parametrize(("preset", "parameters"), [
    ("llama3-8b", 8_030_261_248), ("llama3-70b", 70_553_706_496), ("llama3-405b", 405_853_388_800),
    ("qwen3-32b", 32_762_123_264), ("mistral-7b", 7_248_023_552), ("gemma3-27b", 27_432_406_640),
])
def test_presets_have_the_published_shapes(preset, parameters):
    model = build_model(resolve_source(preset))
    assert sum(p.numel() for p in model.parameters()) == parameters


def test_model_sources(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(resolve_source("tiny-llama").config))
    assert resolve_source(str(tmp_path)).origin.startswith("config")
    assert resolve_source(str(tmp_path / "config.json")).config["hidden_size"] == 128
    model = build_model(resolve_source("qwen3"), {"num_hidden_layers": 1, "vocab_size": 64})
    assert type(model).__name__ == "Qwen3ForCausalLM" and len(model.model.layers) == 1
    nested = build_model(resolve_source("gemma3-27b"), {"text_config.num_hidden_layers": 1,
                                                         "vision_config.num_hidden_layers": 1})
    assert nested.config.text_config.num_hidden_layers == 1
    with pytest.raises(ModelSourceError, match="Did you mean 'llama3-8b'"):
        resolve_source("llama3_8")


def test_names_summary_is_lossless():
    names = ([f"model.layers.{i}.mlp" for i in range(126)] + ["lm_head", ""]
             + [f"a.{i}.e.{j}" for i in (0, 1, 3) for j in range(4)] + ["a.5.e.1", "a.5.e.3"])
    summary = summarize_names(names)
    assert summary[0] == {"pattern": "model.layers.{0..125}.mlp", "count": 126}
    assert {"pattern": "a.{0..1,3}.e.{0..3}", "count": 12} in summary
    assert sorted(n for s in summary for n in expand_pattern(s["pattern"])) == sorted(names)


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    """Run ``meshplan explain ...`` through the CLI entry point, in this process (no import cost)."""
    code = main(["explain", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_json_with_a_plan_file_and_overrides(tmp_path, capsys):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"model.layers.*.mlp.up_proj": "colwise", "model.layers.*.mlp.down_proj": "rowwise"}))
    code, out, err = _cli(capsys, "tiny-llama", "--mesh", "dp_shard=2,tp=2", "--tp-plan", str(plan),
                          "--set", "num_hidden_layers=3", "-o", "reshard_after_forward=false", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["plan"]["source"].startswith("explicit tp_plan")
    assert [e["count"] for e in report["plan"]["entries"]] == [3, 3]
    assert report["plan"]["replicated_linears"]["count"] == 5 * 3 + 1  # q, k, v, o, gate per layer + lm_head
    assert report["model"]["overrides"] == {"num_hidden_layers": 3}
    assert report["strategy"]["options"]["reshard_after_forward"] == "False"


def test_cli_validation_error_exits_non_zero(capsys):
    code, out, err = _cli(capsys, "mistral-7b", "--mesh", "dp_shard=4,tp=3")
    assert code == 2 and "strategy  fsdp2" in out
    assert "TensorParallelSizeError: num_attention_heads (32) must be divisible by TP size (3)" in err
    code, _, err = _cli(capsys, "nosuchmodel", "--mesh", "dp_shard=4")
    assert code == 2 and "ModelSourceError: Unknown model 'nosuchmodel'" in err

