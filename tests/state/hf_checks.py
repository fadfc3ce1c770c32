"""Rank-side checks for the Hugging Face checkpoint tests: folders written by transformers' own
``save_pretrained`` loaded by meshplan under a mesh, against transformers' ``from_pretrained`` in one process.

Only small results travel back to the test process: lists of differing names and worst relative errors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tests.plans.helpers import ARCHITECTURES, build

#: name -> (architecture in tests.plans.helpers, config overrides)
MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("llama", {}),
    "llama_tied": ("llama", {"tie_word_embeddings": True}),
    "llama_kv1": ("llama", {"num_key_value_heads": 1}),  # TP=2 replicates its one KV head
    "qwen3": ("qwen3", {}),
    "mixtral": ("mixtral", {}),
    "qwen3_moe": ("qwen3_moe", {}),
    "gpt_oss": ("gpt_oss", {}),
    "deepseek_v3": ("deepseek_v3", {}),
}
GPT_OSS = ("gpt_oss", {"head_dim": 16, "num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 8,
                       "layer_types": ["sliding_attention", "full_attention"]})


def build_model(name: str) -> torch.nn.Module:
    """The tiny fp32 model ``name`` of :data:`MODELS` (random, perturbed weights)."""
    architecture, overrides = MODELS[name]
    if architecture == "gpt_oss" and architecture not in ARCHITECTURES:
        ARCHITECTURES[architecture] = GPT_OSS
    return build(architecture, **overrides)


def write_folders(root: Path, names: list[str], max_shard_size: str = "60KB") -> dict[str, str]:
    """transformers' ``save_pretrained`` of each model, in several files; ``{name: folder}``."""
    folders = {}
    for name in names:
        folder = root / name
        build_model(name).save_pretrained(folder, max_shard_size=max_shard_size)
        folders[name] = str(folder)
    return folders


def _mesh(shape: dict[str, int]):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", tuple(shape.values()), mesh_dim_names=tuple(shape))


def _logits(model: torch.nn.Module, mesh: Any | None, vocab_size: int) -> torch.Tensor:
    """Logits of one fixed batch; with a ``cp`` dim in ``mesh`` the batch is split over it and gathered back."""
    from meshplan.context_parallel import gather_sequence, shard_batch

    batch = torch.randint(0, vocab_size, (2, 16), generator=torch.Generator().manual_seed(7))
    if mesh is not None and "cp" in (mesh.mesh_dim_names or ()):
        shard = shard_batch({"input_ids": batch}, mesh["cp"])
        return gather_sequence(model(**shard).logits.detach(), mesh["cp"])
    return model(input_ids=batch).logits.detach()


def load_parity(folders: dict[str, str], shape: dict[str, int], options: dict[str, Any]) -> dict[str, Any]:
    """Runs on every rank: each folder loaded by ``meshplan.from_pretrained`` on a mesh of ``shape`` (fp32)
    against ``AutoModelForCausalLM.from_pretrained`` in one process: ``{name: (differing tensor names, logits
    relative error)}`` or the error's message."""
    from torch.distributed.fsdp import MixedPrecisionPolicy
    from transformers import AutoModelForCausalLM

    import meshplan

    results: dict[str, Any] = {}
    for name, folder in folders.items():
        try:
            mesh = _mesh(shape)
            fp32 = {"mp_policy": MixedPrecisionPolicy()} if options.get("strategy", "fsdp2") == "fsdp2" else {}
            model = meshplan.from_pretrained(folder, mesh, **fp32, **options)
            reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
            loaded = meshplan.gather_full_state_dict(model, rank0_only=False)
            expected = reference.state_dict()
            differ = sorted(key for key in expected.keys() | loaded.keys()
                            if key not in loaded or key not in expected or not torch.equal(loaded[key], expected[key]))
            with torch.no_grad():
                logits = _logits(model, mesh, reference.config.vocab_size)
                reference_logits = _logits(reference, None, reference.config.vocab_size)
            error = float((logits - reference_logits).abs().max() / reference_logits.abs().max())
            results[name] = (differ, error)
        except Exception as exc:  # noqa: BLE001 - reported per model, so one failure does not hide the others
            results[name] = f"{type(exc).__name__}: {exc}"
    return results


def round_trip(folder: str, out: str, shape: dict[str, int], options: dict[str, Any]) -> dict[str, Any]:
    """Runs on every rank: from_pretrained -> 2 SGD steps -> meshplan.save_pretrained -> transformers'
    from_pretrained of the written folder against gather_full_state_dict: differing names, and whether the
    steps changed the weights."""
    import torch.distributed as dist
    from torch.distributed.fsdp import MixedPrecisionPolicy
    from transformers import AutoModelForCausalLM

    import meshplan
    import meshplan.state.hf_save

    meshplan.state.hf_save.BATCH_BYTES = 64 * 1024  # several batches of a tiny model
    mesh = _mesh(shape)
    if options.get("strategy", "fsdp2") == "fsdp2":
        options = {"mp_policy": MixedPrecisionPolicy(), **options}
    model = meshplan.from_pretrained(folder, mesh, **options)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(2):
        batch = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(step))
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    meshplan.save_pretrained(model, out, max_shard_size="60KB")
    trained = meshplan.gather_full_state_dict(model, rank0_only=False)
    dist.barrier()
    saved = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
    original = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict()
    return {"differ": sorted(k for k in saved.keys() | trained.keys()
                             if k not in trained or k not in saved or not torch.equal(trained[k], saved[k])),
            "changed": sum(not torch.equal(trained[k], original[k]) for k in original),
            "files": sorted(p.name for p in Path(out).iterdir())}


def write_fp8_folder(folder: Path, block: tuple[int, int] = (32, 32)) -> dict[str, torch.Tensor]:
    """A tiny Llama folder in DeepSeek-V3's block-FP8 format (every 2-D projection weight in float8_e4m3fn with a
    float32 ``weight_scale_inv`` per ``block``, partial blocks at the edges); returns the dequantized state dict the
    loaded model must hold (model keys, float32)."""
    import json

    from safetensors.torch import save_file

    model = build_model("llama")
    model.config.quantization_config = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                        "weight_block_size": list(block)}
    model.config.save_pretrained(folder)
    stored, expected = {}, {}
    for key, tensor in model.state_dict().items():
        if tensor.dim() != 2 or not key.endswith("proj.weight"):
            stored[key] = expected[key] = tensor.contiguous()
            continue
        rows, cols = -(-tensor.shape[0] // block[0]), -(-tensor.shape[1] // block[1])
        padded = torch.zeros(rows * block[0], cols * block[1])
        padded[:tensor.shape[0], :tensor.shape[1]] = tensor
        absmax = padded.reshape(rows, block[0], cols, block[1]).abs().amax(dim=(1, 3))
        scale = (absmax / 448).clamp(min=1e-12)
        full_scale = scale.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
        full_scale = full_scale[:tensor.shape[0], :tensor.shape[1]]
        quantized = (tensor / full_scale).to(torch.float8_e4m3fn)
        stored[key], stored[f"{key}_scale_inv"] = quantized, scale
        expected[key] = quantized.to(torch.float32) * full_scale
    save_file(stored, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "generation_config.json").write_text(json.dumps({}))
    return expected


def fp8_parity(folder: str, expected_file: str, shape: dict[str, int]) -> list[str]:
    """Runs on every rank: ``meshplan.from_pretrained`` of a quantized folder against its dequantized state dict;
    the names of the tensors that differ (and whether ``save_pretrained`` of it still claims a quantization)."""
    import json

    from torch.distributed.fsdp import MixedPrecisionPolicy

    import meshplan

    model = meshplan.from_pretrained(folder, _mesh(shape), mp_policy=MixedPrecisionPolicy(), dtype=torch.float32)
    loaded = meshplan.gather_full_state_dict(model, rank0_only=False)
    expected = torch.load(expected_file)
    differing = sorted(key for key in expected.keys() | loaded.keys()
                       if key not in loaded or key not in expected or not torch.equal(loaded[key], expected[key]))
    meshplan.save_pretrained(model, f"{folder}-saved")  # dequantized: its config must not claim a quantization
    config = json.loads((Path(f"{folder}-saved") / "config.json").read_text())
    return differing + (["config.json keeps quantization_config"] if "quantization_config" in config else [])


def write_mxfp4_folder(folder: Path) -> dict[str, torch.Tensor]:
    """A tiny GPT-OSS folder in its published MXFP4 format: every expert ``gate_up_proj`` / ``down_proj`` as random
    ``_blocks`` / ``_scales`` (uint8, exponents near the bias 127), the rest as saved; returns the state dict the
    loaded model must hold (model keys, float32), dequantized by transformers' ``convert_moe_packed_tensors``."""
    from safetensors.torch import save_file
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    model = build_model("gpt_oss")
    model.config.quantization_config = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn",
                                        "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    model.config.save_pretrained(folder)
    generator = torch.Generator().manual_seed(3)
    stored, expected = {}, {}
    for key, tensor in model.state_dict().items():
        if not key.endswith(("experts.gate_up_proj", "experts.down_proj")):
            stored[key] = expected[key] = tensor.contiguous()
            continue
        experts, inputs, outputs = tensor.shape
        blocks = torch.randint(0, 256, (experts, outputs, inputs // 32, 16), dtype=torch.uint8, generator=generator)
        scales = torch.randint(120, 130, (experts, outputs, inputs // 32), dtype=torch.uint8, generator=generator)
        stored[f"{key}_blocks"], stored[f"{key}_scales"] = blocks, scales
        expected[key] = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
    save_file(stored, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return expected
