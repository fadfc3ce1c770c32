"""``meshplan.load_pretrained`` of a ``PipelineModel`` reads, on each rank, only the tensors of its own stage: its
blocks, plus the embeddings on the first stage and the final norm and head on the last (the keys it reads are
recorded, and ``LoadReport.bytes_read`` is their size). pp_split [1] makes the stages unequal: 1 block and 3."""

from __future__ import annotations

from typing import Any

from safetensors import safe_open

from tests.pipeline.harness import LLAMA4, _fp32

OPTIONS = {"pp_schedule": "1F1B", "pp_microbatches": 2, "pp_split": [1]}
#: the key prefixes each pp rank's stage owns
OWN = [("model.embed_tokens.", "model.layers.0."), ("model.layers.1.", "model.layers.2.", "model.layers.3.",
                                                     "model.norm.", "lm_head.")]


def stage_reads(folder: str) -> dict[str, Any]:
    """Runs on every rank: a meta-device Llama parallelized with pp=2, loaded from ``folder`` while every stored
    tensor read is recorded; the keys read, the report's bytes and its missing / unexpected lists."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from transformers import AutoConfig, AutoModelForCausalLM

    import meshplan
    from meshplan.state.hf_folder import SliceReader

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=torch.float32)
    mesh = init_device_mesh("cpu", (2, 1), mesh_dim_names=("pp", "dp_shard"))
    pipe = meshplan.parallelize(model, mesh, **(_fp32() | OPTIONS))
    read, keys = SliceReader.read, []

    def recording(self, key, region=None):
        keys.append(key)
        return read(self, key, region)

    SliceReader.read = recording
    try:
        report = meshplan.load_pretrained(pipe, folder)
    finally:
        SliceReader.read = read
    return {"keys": sorted(keys), "bytes": report.bytes_read, "missing": report.missing,
            "unexpected": report.unexpected}


def test_each_stage_reads_only_its_own_layers(ranks2, tmp_path) -> None:
    folder = tmp_path / "llama"
    LLAMA4.build().save_pretrained(folder)
    with safe_open(str(folder / "model.safetensors"), "pt") as stored:
        sizes = {key: stored.get_tensor(key).nbytes for key in stored.keys()}
    results = ranks2.run(stage_reads, str(folder), timeout=300)
    for rank, result in enumerate(results):
        expected = sorted(key for key in sizes if key.startswith(OWN[rank]))
        assert result["keys"] == expected, f"rank {rank} read {sorted(set(result['keys']) ^ set(expected))} wrongly"
        assert result["bytes"] == sum(sizes[key] for key in expected), f"rank {rank}: {result['bytes']} bytes read"
        assert result["missing"] == result["unexpected"] == [], result
    assert sorted(key for r in results for key in r["keys"]) == sorted(sizes)  # together: every stored tensor
