"""Peak memory and step time of one long-sequence train step, without and with context parallelism.

Two gloo ranks on CPU, a small Llama (SDPA attention, fp32) parallelized by ``meshplan.parallelize`` with
``fsdp2``, 8,192-token sequences:

* ``cp=1``: mesh ``dp_shard=2``; every rank trains on a whole sequence of its own.
* ``cp=2``: mesh ``dp_shard=1 x cp=2``; the two ranks share one sequence (``shard_batch``: 4,096 tokens each).

Each layout runs in fresh processes (so peak RSS belongs to this run only). Memory is the **peak resident
set size** of each rank (``ru_maxrss``) during the first train step minus its RSS just before it, i.e. what the
step itself needed (activations, gathered parameters, gradients); the absolute peak is printed too. The CPU
allocator has no allocation counters, so RSS is what is measured. The ranks run with glibc's
``MALLOC_MMAP_THRESHOLD_=65536`` (both layouts): large blocks are then mapped and unmapped with each tensor,
so RSS follows the live tensors; with glibc's default dynamic threshold, freed blocks of the sizes seen
before stay in the heap and RSS overstates what is alive (``--default-malloc`` measures that way). Step time
is the median wall time of the steps after the first, between barriers; tokens per second count the tokens
each rank processed.

    .venv/bin/python bench/long_context.py [--seq-len 8192] [--steps 3] [--default-malloc]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time

import torch
import torch.distributed as dist

CONFIG = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
              num_key_value_heads=4, head_dim=32, vocab_size=2048, max_position_embeddings=16384)
LAYOUTS = {1: {"dp_shard": 2}, 2: {"dp_shard": 1, "cp": 2}}


def _rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def run_rank(cp: int, seq_len: int, steps: int) -> dict[str, float]:
    """Runs on every rank: parallelize, then ``steps`` SGD steps on 8k-token sequences."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy
    from transformers import AutoConfig, AutoModelForCausalLM

    import meshplan
    from meshplan.context_parallel import shard_batch

    config = AutoConfig.for_model("llama", **CONFIG)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    shape = LAYOUTS[cp]
    mesh = init_device_mesh("cpu", tuple(shape.values()), mesh_dim_names=tuple(shape))
    model = meshplan.parallelize(model, mesh, mp_policy=MixedPrecisionPolicy())
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(dist.get_rank() if cp == 1 else 0)
    ids = torch.randint(0, config.vocab_size, (1, seq_len), generator=generator)
    batch = {"input_ids": ids, "labels": ids}
    if cp > 1:
        batch = shard_batch(batch, mesh["cp"])
    times, before, peak = [], 0.0, 0.0
    for step in range(steps):
        dist.barrier()
        if step == 0:
            before = _rss_mb()
        start = time.perf_counter()
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        dist.barrier()
        times.append(time.perf_counter() - start)
        if step == 0:
            peak = _peak_rss_mb()
    return {"step_peak_mb": peak - before, "peak_rss_mb": peak, "rss_before_mb": before,
            "step_s": statistics.median(times[1:] or times), "tokens": batch["input_ids"].shape[1]}


def measure(cp: int, seq_len: int, steps: int) -> list[dict[str, float]]:
    from meshplan.plugins.testing import run_on_ranks

    return run_on_ranks(run_rank, 2, cp, seq_len, steps, timeout=1800)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--default-malloc", action="store_true", help="keep glibc's dynamic mmap threshold")
    args = parser.parse_args()
    if not args.default_malloc:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # read by glibc when the rank processes start
    results = {cp: measure(cp, args.seq_len, args.steps) for cp in LAYOUTS}
    for cp, ranks in results.items():
        worst = max(r["step_peak_mb"] for r in ranks)
        step = max(r["step_s"] for r in ranks)
        print(f"cp={cp}: step peak {worst:,.0f} MB per rank (absolute peak RSS "
              f"{max(r['peak_rss_mb'] for r in ranks):,.0f} MB), step {step:.2f} s, "
              f"{ranks[0]['tokens']} tokens per rank, {ranks[0]['tokens'] / step:,.0f} tokens/s per rank")
    ratio = max(r["step_peak_mb"] for r in results[2]) / max(r["step_peak_mb"] for r in results[1])
    absolute = max(r["peak_rss_mb"] for r in results[2]) / max(r["peak_rss_mb"] for r in results[1])
    print(f"cp=2 / cp=1: step peak memory {ratio:.3f}x (goal <= 0.55), absolute peak RSS {absolute:.3f}x")
    print(json.dumps({str(k): v for k, v in results.items()}))


if __name__ == "__main__":
    main()
