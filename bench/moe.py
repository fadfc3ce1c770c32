"""One MoE train step on 2 gloo ranks: expert parallelism vs. experts held whole, time and per-rank bytes.

A Mixtral-shaped model (8 experts, top-2) trains in fp32 with SGD on 2 CPU ranks under three layouts of the
``fsdp2`` strategy:

* ``replicated``: ``dp_replicate=2`` -- every rank holds and computes with every parameter (DDP-like);
* ``fsdp``: ``dp_shard=2`` -- parameters sharded at rest, each layer's experts all-gathered to compute;
* ``ep``: ``dp_shard=2, ep_size=2`` -- each rank holds and computes with 4 of the 8 experts; tokens move by
  all-to-all instead.

Per layout: median step time (forward, backward, optimizer step) over the measured steps, parameter bytes
resident per rank (local shards), and parameter bytes a rank computes with in a step (experts: the ones it
runs). Ratios are printed against ``replicated``.

    .venv/bin/python bench/moe.py [--steps 16] [--layers 4] [--hidden 256]
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

LAYOUTS = {
    "replicated": ({"dp_replicate": 2, "dp_shard": 1}, {}),
    "fsdp": ({"dp_shard": 2}, {}),
    "ep": ({"dp_shard": 2}, {"ep_size": 2}),
}


def _model(layers: int, hidden: int) -> torch.nn.Module:
    from tests.support import tiny_hf

    return tiny_hf("mixtral", num_hidden_layers=layers, hidden_size=hidden, intermediate_size=2 * hidden,
                   num_attention_heads=8, num_key_value_heads=4, head_dim=hidden // 8, vocab_size=1024,
                   num_local_experts=8, num_experts_per_tok=2)


def _bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(resident parameter bytes on this rank, parameter bytes this rank computes with)."""
    from torch.distributed.tensor import DTensor

    from meshplan.experts.expert_parallel import EP_ATTRIBUTE

    resident = computed = 0
    for module in model.modules():
        ep_size = getattr(module, EP_ATTRIBUTE, (1, 1))[1]
        for param in module.parameters(recurse=False):
            local = param.to_local() if isinstance(param, DTensor) else param
            resident += local.numel() * local.element_size()
            computed += param.numel() * param.element_size() // ep_size
    return resident, computed


def run_layout(layout: str, steps: int, layers: int, hidden: int) -> dict[str, float]:
    """Runs on every rank: parallelize, train ``steps`` steps on this rank's half of a batch of 8 x 128."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy

    import meshplan

    shape, options = LAYOUTS[layout]
    mesh = init_device_mesh("cpu", tuple(shape.values()), mesh_dim_names=tuple(shape))
    model = meshplan.parallelize(_model(layers, hidden), mesh, mp_policy=MixedPrecisionPolicy(), **options)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(dist.get_rank())
    times = []
    for step in range(steps + 2):  # two warm-up steps
        ids = torch.randint(0, 1024, (4, 128), generator=generator)
        dist.barrier()
        start = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        dist.barrier()
        if step >= 2:
            times.append(time.perf_counter() - start)
    resident, computed = _bytes(model)
    return {"step_s": statistics.median(times), "resident": resident, "computed": computed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    args = parser.parse_args()

    from meshplan.plugins.testing import RankPool

    pool = RankPool(2)
    try:
        results = {name: pool.run(run_layout, name, args.steps, args.layers, args.hidden, timeout=600)[0]
                   for name in LAYOUTS}
    finally:
        pool.close()
    base = results["replicated"]
    print(f"Mixtral shape: {args.layers} layers, hidden {args.hidden}, 8 experts top-2; 2 gloo ranks, fp32, SGD; "
          f"median of {args.steps} steps, batch 4 x 128 tokens per rank")
    print(f"{'layout':<11} {'step (s)':>9} {'x repl.':>8} {'resident MiB/rank':>18} {'x repl.':>8} "
          f"{'computed-with MiB/rank':>23} {'x repl.':>8}")
    for name, r in results.items():
        print(f"{name:<11} {r['step_s']:>9.3f} {r['step_s'] / base['step_s']:>8.2f} "
              f"{r['resident'] / 2**20:>18.2f} {r['resident'] / base['resident']:>8.2f} "
              f"{r['computed'] / 2**20:>23.2f} {r['computed'] / base['computed']:>8.2f}")


if __name__ == "__main__":
    main()
