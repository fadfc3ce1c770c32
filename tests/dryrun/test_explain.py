"""``meshplan explain``: the real parallelize path on the meta device with a fake world."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

import meshplan
from meshplan.cli.main import main
from meshplan.core.errors import MeshError, TensorParallelSizeError
from meshplan.core.torch_private import StridedShard as _StridedShard
from meshplan.dryrun import explain, render_text
from meshplan.dryrun.all_ranks import all_ranks, fsdp_sharded_parameters
from meshplan.dryrun.meshspec import build_mesh, parse_mesh_spec
from meshplan.dryrun.modelsource import ModelSourceError, build_model, resolve_source
from meshplan.dryrun.name_summary import expand_pattern, summarize_names
from meshplan.dryrun.shared_ranks import share_rank_list
from meshplan.dryrun.values import json_value


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
    assert report["schema"] == "meshplan.explain/2" and report["error"] is None
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
class SeenOptions(meshplan.ExpertParallelOptions):
    dp_mesh_name: str = "dp"
    dp_shard_cp_mesh_name: str = "dp_shard_cp"


class SeeingStrategy(meshplan.Strategy):
    name = "seeing"
    supports = frozenset({"tp", "ep"})
    options_class = SeenOptions

    def parallelize(self, model, roles, plans, options, validated):
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
    report = explain("tiny-llama", "dp_replicate=2,dp_shard=2", strategy="seeing", ep_size=1)
    assert report["strategy"]["provenance"].startswith("runtime")
    assert report["strategy"]["options"]["dp_mesh_name"] == "dp" and report["strategy"]["options"]["ep_size"] == 1
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
    ("mixtral-8x7b", 46_702_792_704), ("qwen3-235b-a22b", 235_093_634_560),
    ("deepseek-v3", 671_026_404_352),  # without the multi-token-prediction layer, which transformers does not build
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
    assert report["strategy"]["options"]["reshard_after_forward"] is False


def test_cli_validation_error_exits_non_zero(capsys):
    code, out, err = _cli(capsys, "mistral-7b", "--mesh", "dp_shard=4,tp=3")
    assert code == 2 and "strategy  fsdp2" in out
    assert "TensorParallelSizeError: num_attention_heads (32) must be divisible by TP size (3)" in err
    code, _, err = _cli(capsys, "nosuchmodel", "--mesh", "dp_shard=4")
    assert code == 2 and "ModelSourceError: Unknown model 'nosuchmodel'" in err



# ---- every rank, from placements (memory.parameters.max_local) ----

TINY = dict(num_hidden_layers=2, hidden_size=40, intermediate_size=72, num_attention_heads=4, num_key_value_heads=2,
            head_dim=10, vocab_size=251)  # 251 rows: uneven over every TP and FSDP size below


class Uneven(nn.Module):
    """9 output rows: TP=2 leaves 5 and 4, FSDP=4 then leaves (2, 2, 1, 0) and (1, 1, 1, 1), not DTensor's order."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(6, 9, bias=False)
        self.down = nn.Linear(9, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.up(x))


def _shards_on_every_rank(fake_pg, build, spec: str, tp_plan=None, **options):
    """(real local elements per rank and parameter, rank 0's all-rank computation), one fake world per rank."""
    dims = parse_mesh_spec(spec)
    world = math.prod(dims.values())
    real, computed = [], None
    for rank in range(world):
        with fake_pg(world, rank):
            mesh = build_mesh(dims)
            strategy = meshplan.get_strategy("fsdp2")
            model = meshplan.prepare(build(), mesh, strategy, tp_plan, **options).apply()
            real.append({n: (p.to_local() if isinstance(p, DTensor) else p).numel()
                         for n, p in model.named_parameters()})
            if rank == 0:
                computed = all_ranks(model.named_parameters(), world, fsdp_sharded_parameters(model))
    return real, computed


@pytest.mark.filterwarnings("ignore:Slicing a flattened dim:UserWarning")
@pytest.mark.parametrize(("model_type", "spec", "ep"), [
    ("mixtral", "dp_shard=3,tp=2,cp=2", 1),  # 3-D experts (3 over 6 FSDP ranks), FSDP over non-adjacent flattened dims
    ("llama", "dp_replicate=2,dp_shard=2,tp=2", 1),  # HSDP x TP
    ("uneven", "dp_shard=4,tp=2", 1),  # FSDP2 chunks the TP-local rows (_StridedShard), uneven
    pytest.param("qwen3_moe", "dp_replicate=2,dp_shard=2,tp=2", 2, id="qwen3_moe-ep2"),  # carved EP meshes, HSDP
])
def test_every_ranks_elements_match_its_real_shards(fake_pg, model_type, spec, ep):
    if model_type == "uneven":
        build, plan = Uneven, {"up": "colwise", "down": "rowwise"}
    else:
        overrides = TINY | {"mixtral": {"num_local_experts": 3}, "llama": {},
                            "qwen3_moe": {"num_experts": 4, "moe_intermediate_size": 24, "num_experts_per_tok": 2}
                            }[model_type]
        build, plan = (lambda: build_model(resolve_source(model_type), overrides)), None
    real, computed = _shards_on_every_rank(fake_pg, build, spec, plan, **({"ep_size": ep} if ep > 1 else {}))
    for rank, shards in enumerate(real):
        assert computed.local_by_name(rank) == shards, rank
    per_rank = [sum(shards.values()) for shards in real]
    assert computed.per_rank.tolist() == per_rank and len(set(per_rank)) > 1  # uneven on purpose
    assert computed.max_local == max(per_rank) and computed.max_local_rank == per_rank.index(max(per_rank))


def test_strided_shard_outside_fsdp_follows_dtensor(fake_pg):
    """distribute_tensor's _StridedShard splits first and chunks each piece: not FSDP2's order."""
    for rank in range(8):
        with fake_pg(8, rank):
            mesh = init_device_mesh("cpu", (4, 2), mesh_dim_names=("dp", "tp"))
            weight = distribute_tensor(torch.zeros(9, 3, device="meta"), mesh,
                                       [_StridedShard(0, split_factor=2), Shard(0)], src_data_rank=None)
            assert all_ranks([("w", weight)], 8).local_by_name(rank)["w"] == weight.to_local().numel()


ATTENTION_ONLY = {"model.layers.*.self_attn.q_proj": "colwise", "model.layers.*.self_attn.k_proj": "colwise",
                  "model.layers.*.self_attn.v_proj": "colwise", "model.layers.*.self_attn.o_proj": "rowwise"}


@pytest.fixture(scope="module")
def mixtral_report():
    """Tiny Mixtral, 4 experts, dp_shard=2 x tp=2, a plan that leaves the experts (and embeddings) out of TP."""
    return explain("mixtral", "dp_shard=2,tp=2", tp_plan=ATTENTION_ONLY, overrides=TINY | {"num_local_experts": 4})


def test_worst_rank_experts_and_imbalance_note(mixtral_report):
    report, params = mixtral_report, mixtral_report["memory"]["parameters"]
    # rank 0 (dp_shard 0, tp 0): q/k/v/o cut by TP then FSDP, 1,200 per layer; experts whole on every TP rank,
    # 2 of 4 per FSDP rank: [2, 144, 40] + [2, 40, 72] per layer; router [2, 40]; norms 20 + 20 per layer, 20
    # final; embed_tokens and lm_head 126 of 251 rows each (FSDP's first chunk is the larger)
    expected = 2 * (1_200 + 2 * 144 * 40 + 2 * 40 * 72 + 2 * 40 + 40) + 20 + 2 * 126 * 40
    assert params["total"] == 99_320 and params["shards"] == 4
    assert params["max_local"] == params["local"] == expected == 47_300
    assert params["max_local_rank"] == 0 and params["max_local_coordinate"] == {"dp_shard": 0, "tp": 0}
    assert params["max_local_overhead"] == pytest.approx(47_300 / (99_320 / 4) - 1)
    replicated = report["replicated_parameters"]
    assert replicated["dims"] == {"tp": 2}
    rows = {r["pattern"]: r for r in replicated["parameters"]}
    assert rows["model.layers.{0..1}.mlp.experts.gate_up_proj"] == {
        "pattern": "model.layers.{0..1}.mlp.experts.gate_up_proj", "count": 2, "shape": [4, 144, 40], "over": ["tp"]}
    assert {"model.layers.{0..1}.mlp.gate.weight", "model.embed_tokens.weight", "lm_head.weight"} <= set(rows)
    assert not any("norm" in p for p in rows)  # 1-D parameters are not listed
    assert replicated["count"] == 8 and replicated["elements"] == 2 * 4 * (144 * 40 + 40 * 72 + 40) + 2 * 251 * 40
    note = next(n for n in report["notes"] if n.startswith("The worst rank (0)"))
    assert "experts.gate_up_proj" in note and "1.90 x the ideal" in note
    text = render_text(report)
    assert "parameters whole on every tp rank (8 tensors" in text and "this is the worst rank" in text
    json.dumps(report)


def test_worst_rank_is_reported_next_to_the_rank_shown():
    report = explain("tiny-llama", "dp_shard=3,tp=2", overrides={"vocab_size": 251}, rank=5)
    params = report["memory"]["parameters"]
    assert params["local"] < params["max_local"] and params["max_local_rank"] == 0
    assert report["memory"]["bytes"]["params"]["max_local"] == 4 * params["max_local"]
    assert report["replicated_parameters"]["count"] == 0 and not report["notes"]  # +1.3 %: under the 1.10 note
    assert f"worst rank 0 (dp_shard=0, tp=0): {params['max_local']:,}" in render_text(report)


def test_llama_worst_rank_and_no_replicated_matrices(llama8b_report):
    params = llama8b_report["memory"]["parameters"]
    assert params["max_local"] == params["local"] == 251_003_904 and params["max_local_rank"] == 0
    assert llama8b_report["replicated_parameters"] == {"dims": {"tp": 8}, "count": 0, "elements": 0,
                                                       "parameters": []}


def test_options_are_json_values():
    report = explain("tiny-llama", "dp_shard=2", precision="fp32")
    options = report["strategy"]["options"]
    assert options["reshard_after_forward"] is True and options["activation_checkpointing_every"] == 2
    assert options["mp_policy"] == ("MixedPrecisionPolicy(param_dtype=None, reduce_dtype=None, output_dtype=None, "
                                    "cast_forward_inputs=True)")
    assert json_value(torch.bfloat16) == "bfloat16" and json_value((1, 2.5, None)) == [1, 2.5, None]
    assert json_value(render_text) == "meshplan.dryrun.render.render_text"
    assert json_value(object()) == "<object object>"  # no address: reports are deterministic


@pytest.mark.filterwarnings("ignore:Slicing a flattened dim:UserWarning")
def test_cp_in_the_mesh_spec():
    report = explain("tiny-llama", "dp_shard=2,cp=2,tp=2", overrides={"vocab_size": 251})
    params = report["memory"]["parameters"]
    assert report["mesh"]["roles"]["cp"] == {"dims": ["cp"], "size": 2}
    assert params["shards"] == 8 and params["max_local_coordinate"] == {"dp_shard": 0, "cp": 0, "tp": 0}
    assert params["max_local"] == params["local"] and not report["notes"]


def test_expert_parallel_plan_and_worst_rank():
    overrides = TINY | {"num_experts": 4, "moe_intermediate_size": 24, "num_experts_per_tok": 2}
    report = explain("qwen3_moe", "dp_shard=2,tp=2", ep_size=2, overrides=overrides)
    assert report["strategy"]["options"]["ep_size"] == 2 and report["mesh"]["roles"]["ep"]["size"] == 2
    ep_plan = report["ep_plan"]
    assert ep_plan["ep_size"] == 2 and ep_plan["entries"][0]["modules"] == [
        {"pattern": "model.layers.{0..1}.mlp.experts", "count": 2}]
    assert report["replicated_parameters"]["dims"] == {"tp": 2, "ep": 2}
    params = report["memory"]["parameters"]
    assert params["max_local"] >= params["local"] and params["max_local_rank"] is not None
    assert "ep plan" in render_text(report)


def test_dry_run_meshes_share_one_rank_tuple():
    """Meshes sliced, flattened or concatenated from the dry run's root share one tuple of ranks and equal the
    meshes torch builds without sharing (ranks, hash, equality)."""
    from torch.distributed.device_mesh import DeviceMesh

    with meshplan.fake_process_group(16, rank=5):
        plain, shared = build_mesh({"dp_shard": 4, "tp": 4}), build_mesh({"dp_shard": 4, "tp": 4})
        share_rank_list(shared)
        derived = [(shared["tp"], plain["tp"]), (shared["dp_shard"], plain["dp_shard"]),
                   (shared._flatten("dp_tp"), plain._flatten("dp_tp")),
                   (DeviceMesh._concatenate([shared["dp_shard"], shared["tp"]]),
                    DeviceMesh._concatenate([plain["dp_shard"], plain["tp"]]))]
        for mine, torchs in derived:
            assert mine._flatten_rank_map is shared._flatten_rank_map
            assert mine == torchs and hash(mine) == hash(torchs)
            assert torch.equal(mine.mesh, torchs.mesh) and mine.get_coordinate() == torchs.get_coordinate()


# ---- pipeline parallelism ----

PP_TINY = TINY | {"num_hidden_layers": 4}


@pytest.mark.parametrize(("mesh", "options"), [
    ("pp=2,dp_shard=2,tp=2", {}),
    ("dp_shard=2,pp=2,tp=2", {"pp_schedule": "interleaved1f1b", "pp_stages_per_rank": 2, "pp_microbatches": 4}),
])
def test_explain_with_pp_every_stage_and_the_worst_rank(mesh, options):
    """Per-stage numbers add up to the model; each pp rank's worst rank and the overall worst rank equal the real
    stage shards that explain builds when that rank is the one shown; the split raises no tied-weight note."""
    from meshplan.pipeline.schedules import bubble_fraction

    reports = [explain("llama", mesh, overrides=PP_TINY, options=options, rank=r) for r in range(8)]
    first = reports[0]
    pipeline, total = first["pipeline"], first["model"]["parameters"]
    assert sum(s["parameters"] for s in pipeline["stages"]) == total
    assert sum(s["bytes"]["params"] for s in pipeline["stages"]) == 4 * total
    assert len(pipeline["stages"]) == 2 * options.get("pp_stages_per_rank", 1)
    bounds = [s["blocks"] for s in pipeline["stages"]]
    assert bounds[0][0] == 0 and bounds[-1][1] == PP_TINY["num_hidden_layers"]
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    assert pipeline["bubble_fraction"] == round(bubble_fraction(
        pipeline["schedule"], 2, pipeline["microbatches"], pipeline["stages_per_rank"]), 4)
    assert pipeline["peak_in_flight_microbatches"] >= 1
    local = [r["memory"]["parameters"]["local"] for r in reports]
    for report in reports:
        assert not any("tied weight" in n or "disagrees" in n or "not reported" in n for n in report["notes"])
        assert report["memory"]["parameters"]["max_local"] == max(local)
        assert report["memory"]["parameters"]["shards"] == 8
    for row in pipeline["pp_ranks"]:
        assert row["local"] == local[row["worst_rank"]]
        assert row["bytes"]["params"] == reports[row["worst_rank"]]["memory"]["bytes"]["params"]["local"]
    text = render_text(first)
    assert "pipeline  " in text and "its worst rank" in text and "tied weight" not in text


@pytest.mark.parametrize(("schedule", "pp", "m", "v", "peak"), [
    ("GPipe", 2, 8, 1, 8), ("1F1B", 4, 8, 1, 4), ("1F1B", 4, 4, 1, 4), ("LoopedBFS", 2, 4, 2, 8),
    ("Interleaved1F1B", 2, 4, 2, 5),  # torch's warm-up: (v - 1) * 2 per round + 2 * (pp - 1), then one forward
    ("InterleavedZeroBubble", 4, 8, 2, 8),  # (v - 1) * 4 + 1 * 3 + 1
])
def test_peak_in_flight_microbatches_follows_torchs_warm_up(schedule, pp, m, v, peak):
    from meshplan.dryrun.pipeline_ranks import peak_in_flight
    from meshplan.pipeline.plan import PipelinePlan
    from meshplan.pipeline.schedules import resolve_schedule

    assert peak_in_flight(PipelinePlan(resolve_schedule(schedule), pp, m, v, None, ())) == peak
