"""Regional compilation (``compile=True``) vs. eager: compile time and step time, 2 gloo ranks on CPU.

A small Llama trains in fp32 with SGD under ``fsdp2`` on ``dp_shard=1 x tp=2`` twice in one run, eager and with
``compile=True`` (inductor, each block compiled in place). Reported per mode: the first step (which compiles) and
the median of the following steps; the compiled/eager ratio of each is printed side by side.

    .venv/bin/python bench/compile.py [--steps 8] [--layers 2] [--hidden 256] [--seq 256]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # spawned ranks inherit sys.path, so they import tests.support too


def run_mode(compiled: bool, steps: int, layers: int, hidden: int, seq: int) -> dict[str, float]:
    """Runs on every rank: parallelize, one first step, then ``steps`` timed steps; seconds."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy

    import meshplan
    from tests.support import tiny_hf

    model = tiny_hf("llama", num_hidden_layers=layers, hidden_size=hidden, intermediate_size=2 * hidden,
                    num_attention_heads=8, num_key_value_heads=4, head_dim=hidden // 8, vocab_size=1024,
                    max_position_embeddings=seq, attn_implementation="sdpa")
    mesh = init_device_mesh("cpu", (1, 2), mesh_dim_names=("dp_shard", "tp"))
    model = meshplan.parallelize(model, mesh, mp_policy=MixedPrecisionPolicy(), compile=compiled)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    times = []
    for _ in range(steps + 1):
        ids = torch.randint(0, 1024, (2, seq), generator=generator)
        dist.barrier()
        start = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        dist.barrier()
        times.append(time.perf_counter() - start)
    return {"first_s": times[0], "step_s": statistics.median(times[1:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--seq", type=int, default=256)
    args = parser.parse_args()

    from meshplan.plugins.testing import RankPool

    pool = RankPool(2)
    try:
        results = {name: pool.run(run_mode, name == "compiled", args.steps, args.layers, args.hidden, args.seq,
                                  timeout=900)[0] for name in ("eager", "compiled")}
    finally:
        pool.close()
    eager = results["eager"]
    print(f"Llama: {args.layers} layers, hidden {args.hidden}; fsdp2 dp_shard=1 x tp=2, 2 gloo ranks, fp32, SGD; "
          f"batch 2 x {args.seq}; median of {args.steps} steps after the first")
    print(f"{'mode':<9} {'first step (s)':>15} {'x eager':>8} {'step (s)':>9} {'x eager':>8}")
    for name, r in results.items():
        print(f"{name:<9} {r['first_s']:>15.2f} {r['first_s'] / eager['first_s']:>8.2f} "
              f"{r['step_s']:>9.3f} {r['step_s'] / eager['step_s']:>8.2f}")


if __name__ == "__main__":
    main()
