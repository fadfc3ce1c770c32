"""Train-step time of a model parallelized by ``meshplan.parallelize`` vs the same layout written by hand.

Two gloo ranks on CPU. Each rank builds two copies of a small HF Llama with the same weights: one through
``meshplan.parallelize`` (fsdp2), one with the equivalent bare torch calls. ``--precision fp32`` (default)
passes ``mp_policy=MixedPrecisionPolicy()`` to both; ``bf16`` uses fsdp2's default policy (bf16 parameters,
fp32 reduction, fp32 output at the root) and its hand-written equivalent, but bf16 matmuls are ~20x slower
than fp32 on this CPU (8 s per step), so it needs few pairs. It checks that both layouts are identical (parameter names,
placements, local shapes), then times AdamW train steps in pairs, alternating which copy goes first, and
prints the median of the per-pair time ratios (goal <= 1.01: meshplan adds nothing to the step itself).

    .venv/bin/python bench/overhead.py [--layout fsdp|tp] [--precision fp32|bf16] [--pairs 40]

``fsdp``: FSDP2 over 2 ranks. ``tp``: tensor parallel over 2 ranks (registered Llama plan vs
``parallelize_module``) with FSDP2 over a data-parallel dim of size 1.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist
from handwritten import layout_of, shard_llama_by_hand

CONFIG = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
              num_key_value_heads=4, head_dim=32, vocab_size=2048, max_position_embeddings=512)
MESHES = {"fsdp": {"dp_shard_cp": 2}, "tp": {"dp_shard_cp": 1, "tp": 2}}


def build() -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", **CONFIG)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def policies(precision: str):  # noqa: ANN201 - (block policy, root policy)
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision == "fp32":
        return MixedPrecisionPolicy(), MixedPrecisionPolicy()
    return (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32),
            MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, output_dtype=torch.float32))


def by_hand(model: torch.nn.Module, mesh, layout: str, precision: str) -> torch.nn.Module:
    """The layout ``meshplan.parallelize(model, mesh)`` builds, with torch calls only."""
    block, root = policies(precision)
    return shard_llama_by_hand(model, mesh["tp"] if layout == "tp" else None, mesh["dp_shard_cp"], block, root)


def timed_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ids: torch.Tensor) -> tuple[float, float]:
    """(wall s, this process's CPU s) of one train step, between barriers."""
    dist.barrier()
    wall, cpu = time.perf_counter(), time.process_time()
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    dist.barrier()
    return time.perf_counter() - wall, time.process_time() - cpu


def run(layout: str, precision: str, pairs: int, warmup: int, batch: int, seq_len: int) -> dict:
    """Runs on every rank; returns rank-local timings."""
    from torch.distributed.device_mesh import init_device_mesh

    import meshplan

    shape = MESHES[layout]
    mesh = init_device_mesh("cpu", tuple(shape.values()), mesh_dim_names=tuple(shape))
    options = {"mp_policy": policies(precision)[1]} if precision == "fp32" else {}
    models = {"meshplan": meshplan.parallelize(build(), mesh, **options),
              "torch": by_hand(build(), mesh, layout, precision)}
    same_layout = layout_of(models["meshplan"]) == layout_of(models["torch"])
    optimizers = {name: torch.optim.AdamW(model.parameters(), lr=1e-4) for name, model in models.items()}
    generator = torch.Generator().manual_seed(dist.get_rank())
    ids = torch.randint(0, CONFIG["vocab_size"], (batch, seq_len), generator=generator)
    for _ in range(warmup):
        for name in models:
            timed_step(models[name], optimizers[name], ids)
    times: dict[str, list[tuple[float, float]]] = {"meshplan": [], "torch": []}
    for index in range(pairs):
        order = ("meshplan", "torch") if index % 2 == 0 else ("torch", "meshplan")
        for name in order:
            times[name].append(timed_step(models[name], optimizers[name], ids))
    return {"same_layout": same_layout, "times": times}


def main() -> None:
    from meshplan.plugins.testing import run_on_ranks

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layout", choices=sorted(MESHES), default="fsdp")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--pairs", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2, help="sequences per rank")
    parser.add_argument("--seq-len", type=int, default=128)
    args = parser.parse_args()
    results = run_on_ranks(run, 2, args.layout, args.precision, args.pairs, args.warmup, args.batch, args.seq_len,
                           timeout=3600)
    times = results[0]["times"]
    print(f"layout {args.layout}, {args.precision}, on 2 gloo ranks, mesh {MESHES[args.layout]}, model {CONFIG}, "
          f"batch {args.batch} x {args.seq_len} per rank, {args.pairs} pairs")
    print(f"identical layout on every rank: {all(r['same_layout'] for r in results)}")
    for column, label in ((0, "wall"), (1, "CPU (rank 0)")):
        ours = [t[column] for t in times["meshplan"]]
        theirs = [t[column] for t in times["torch"]]
        ratios = [a / b for a, b in zip(ours, theirs)]
        quartiles = statistics.quantiles(ratios, n=4)
        print(f"{label}: median step meshplan {statistics.median(ours) * 1e3:.1f} ms, torch "
              f"{statistics.median(theirs) * 1e3:.1f} ms; median per-pair ratio meshplan/torch "
              f"{statistics.median(ratios):.4f} (quartiles {quartiles[0]:.4f} .. {quartiles[2]:.4f})")


if __name__ == "__main__":
    main()
