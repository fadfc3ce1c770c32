"""meshplan.from_pretrained / load_pretrained / save_pretrained against transformers in one process, on 4 gloo
ranks: folders written by transformers' own save_pretrained (hub format, several files) load bitwise under every
layout, and what meshplan writes loads in transformers unchanged."""

from __future__ import annotations

import pytest

from tests.state.hf_checks import MODELS, load_parity, round_trip, write_folders

pytestmark = pytest.mark.distributed

DENSE = ["llama", "llama_tied", "qwen3"]
MOE = ["mixtral", "qwen3_moe", "gpt_oss", "deepseek_v3"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, str]:
    return write_folders(tmp_path_factory.mktemp("hf"), list(MODELS))


def _assert_parity(results: list[dict], names: list[str]) -> None:
    for name in names:
        outcome = results[0][name]
        assert not isinstance(outcome, str), f"{name}: {outcome}"
        differ, logits_error = outcome
        assert differ == [], f"{name}: {differ}"
        assert logits_error <= 1e-6, f"{name}: logits {logits_error:.2e}"
    assert all(result == results[0] for result in results[1:])


LAYOUTS = {
    "fsdp": ({"dp_shard": 4}, {}, DENSE + MOE),
    "hsdp": ({"dp_replicate": 2, "dp_shard": 2}, {}, DENSE + MOE),
    "tp_sp": ({"dp_shard": 2, "tp": 2}, {"sequence_parallel": True}, DENSE + ["llama_kv1"] + MOE),
    "ep": ({"dp_shard": 4}, {"ep_size": 2}, MOE),
    "ep_tp": ({"dp_shard": 2, "tp": 2}, {"ep_size": 2}, MOE),
    "cp": ({"dp_shard": 2, "cp": 2}, {}, DENSE + MOE),
    "ddp": ({"dp": 4}, {"strategy": "ddp"}, ["llama_tied", "mixtral"]),
    "ddp_tp": ({"dp": 2, "tp": 2}, {"strategy": "ddp"}, ["llama_tied", "mixtral"]),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_loads_bitwise_like_transformers(ranks4, folders, layout):
    shape, options, names = LAYOUTS[layout]
    _assert_parity(ranks4.run(load_parity, {name: folders[name] for name in names}, shape, options), names)


ROUND_TRIPS = {
    "llama_tied-fsdp_tp": ("llama_tied", "tp_sp"),
    "mixtral-fsdp_tp": ("mixtral", "tp_sp"),
    "mixtral-ep_tp": ("mixtral", "ep_tp"),
    "qwen3_moe-ep_tp": ("qwen3_moe", "ep_tp"),
    "qwen3_moe-fsdp_tp": ("qwen3_moe", "tp_sp"),
    "llama-fsdp": ("llama", "fsdp"),
    "qwen3-hsdp": ("qwen3", "hsdp"),
    "llama_tied-ddp": ("llama_tied", "ddp"),
}


@pytest.mark.parametrize("case", list(ROUND_TRIPS))
def test_round_trip_through_save_pretrained(ranks4, folders, tmp_path, case):
    name, layout = ROUND_TRIPS[case]
    shape, options, _ = LAYOUTS[layout]
    results = ranks4.run(round_trip, folders[name], str(tmp_path / "out"), shape, options)
    assert results[0]["differ"] == [] and results[0]["changed"] > 0
    assert "model.safetensors.index.json" in results[0]["files"] and "config.json" in results[0]["files"]
    assert all(result == results[0] for result in results)


def _megatron_logits_error(folder: str) -> float:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from transformers import AutoModelForCausalLM

    import meshplan

    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method="tcp://127.0.0.1:29561", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cuda", (1, 1), mesh_dim_names=("dp", "tp"))
        model = meshplan.from_pretrained(folder, mesh, strategy="megatron_fsdp", dtype=torch.float32)
        reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).cuda()
        batch = torch.randint(0, 256, (2, 16), device="cuda")
        with torch.no_grad():
            logits, expected = model(input_ids=batch).logits, reference(input_ids=batch).logits
        return float((logits - expected).abs().max() / expected.abs().max())
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="Megatron-FSDP needs a CUDA device")
def test_megatron_fsdp_loads_like_transformers_on_one_gpu(folders):
    pytest.importorskip("megatron_fsdp")
    assert _megatron_logits_error(folders["llama"]) <= 1e-5
