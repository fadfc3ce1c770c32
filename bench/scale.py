"""How long ``meshplan.parallelize`` takes on a Llama-3-405B-shaped model for 16,384 ranks, vs bare torch.

The model (126 layers, hidden 16384, 128 heads, 8 KV heads, vocab 128256; ``meshplan/presets/llama3-405b.json``)
is built on the meta device; a fake process group of 16,384 ranks gives the mesh
``dp_replicate 8 x dp_shard_cp 256 x tp 8``. Each round builds two fresh meta models and times, in
alternating order:

* **meshplan**: ``meshplan.parallelize(model, mesh)`` (fsdp2 defaults, the registered Llama TP plan), split
  into ``prepare`` (plan resolution, matching, validation) and ``apply``;
* **torch**: the same layout written with bare torch calls (``parallelize_module`` with the same plan,
  ``fully_shard`` per layer and at the root with the same mixed-precision and reshard settings).

It prints per-round times, the median ratio (goal <= 1.10) and checks that both layouts are identical:
same parameter names, placements and local (per-rank) shapes, hence the same per-rank element count.
The ratio uses this process's CPU time (``time.process_time``): the work is single-threaded and
communication-free, so CPU time is less disturbed by other jobs on a shared machine than wall time (printed
too). Because even CPU time varies by +-20 % on a busy machine, the script also measures meshplan's *own*
time: its total minus the time spent inside the torch calls it makes (``parallelize_module``,
``fully_shard``), which does not depend on how fast torch happens to run in that round.

    .venv/bin/python bench/scale.py [--rounds 3] [--rank 0]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch
import torch.distributed.fsdp
import torch.distributed.tensor.parallel
from handwritten import layout_of, shard_llama_by_hand
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy
from torch.distributed.tensor import DTensor

import meshplan
from meshplan.core.fake_pg import fake_process_group
from meshplan.dryrun.modelsource import build_model, resolve_source

MESH = {"dp_replicate": 8, "dp_shard_cp": 256, "tp": 8}


def meta_model() -> torch.nn.Module:
    return build_model(resolve_source("llama3-405b"), device="meta")


def by_hand(model: torch.nn.Module, mesh: DeviceMesh) -> torch.nn.Module:
    """The layout meshplan builds, written directly against torch."""
    block_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    root_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                       output_dtype=torch.float32)
    return shard_llama_by_hand(model, mesh["tp"], mesh["dp_replicate", "dp_shard_cp"], block_policy, root_policy)


def local_elements(model: torch.nn.Module) -> int:
    return sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in model.parameters())


class TorchTime:
    """Accumulates CPU time spent inside the torch calls meshplan makes (patched in the torch packages that
    meshplan imports them from when it applies a plan)."""

    TARGETS = ((torch.distributed.tensor.parallel, "parallelize_module"), (torch.distributed.fsdp, "fully_shard"))

    def __init__(self) -> None:
        self.seconds = 0.0
        self._saved: list[tuple[object, str, object]] = []

    def _timed(self, fn):  # noqa: ANN001, ANN202
        def wrapper(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            start = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.process_time() - start
        return wrapper

    def __enter__(self) -> TorchTime:
        for module, name in self.TARGETS:
            original = getattr(module, name)
            self._saved.append((module, name, original))
            setattr(module, name, self._timed(original))
        return self

    def __exit__(self, *exc: object) -> None:
        for module, name, original in self._saved:
            setattr(module, name, original)


def time_meshplan(mesh: DeviceMesh) -> tuple[float, float, float, float, torch.nn.Module]:
    """(prepare CPU s, apply CPU s, CPU s inside torch calls, total wall s, model)."""
    model = meta_model()
    with TorchTime() as in_torch:
        wall, start = time.perf_counter(), time.process_time()
        prepared = meshplan.prepare(model, mesh)
        middle = time.process_time()
        prepared.apply()
        end = time.process_time()
    return middle - start, end - middle, in_torch.seconds, time.perf_counter() - wall, model


def time_torch(mesh: DeviceMesh) -> tuple[float, float, torch.nn.Module]:
    """(CPU s, wall s, model)."""
    model = meta_model()
    wall, start = time.perf_counter(), time.process_time()
    by_hand(model, mesh)
    return time.process_time() - start, time.perf_counter() - wall, model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rank", type=int, default=0, help="which of the 16,384 ranks to play")
    args = parser.parse_args()
    world = 1
    for size in MESH.values():
        world *= size
    with fake_process_group(world, rank=args.rank):
        mesh = init_device_mesh("cpu", tuple(MESH.values()), mesh_dim_names=tuple(MESH))
        meshplan.get_strategy("fsdp2")  # load plugins (and transformers) outside the timed region
        time_torch(mesh)  # warm-up: first-use costs of torch's sub-mesh and DTensor caches
        ratios, rows = [], []
        same_layout = True
        for round_index in range(args.rounds):
            if round_index % 2 == 0:
                prep, apply, in_torch, our_wall, ours = time_meshplan(mesh)
                bare, bare_wall, theirs = time_torch(mesh)
            else:
                bare, bare_wall, theirs = time_torch(mesh)
                prep, apply, in_torch, our_wall, ours = time_meshplan(mesh)
            same_layout &= layout_of(ours) == layout_of(theirs)
            elements = (local_elements(ours), local_elements(theirs))
            ratios.append((prep + apply) / bare)
            own = prep + apply - in_torch
            rows.append((prep, apply, bare, elements, own, own / in_torch))
            del ours, theirs
            gc.collect()
            print(f"round {round_index}: CPU meshplan {prep + apply:.2f} s (prepare {prep:.2f} + apply {apply:.2f}; "
                  f"own {own:.3f} s), torch {bare:.2f} s, ratio {ratios[-1]:.3f} | wall {our_wall:.2f} s vs "
                  f"{bare_wall:.2f} s | per-rank elements {elements[0]:,} vs {elements[1]:,}", flush=True)
        total = sum(p.numel() for p in meta_model().parameters())
    print(f"mesh {MESH} = {world} ranks (playing rank {args.rank}); model {total:,} parameters")
    print(f"median meshplan/torch CPU-time ratio: {statistics.median(ratios):.3f} over {args.rounds} rounds "
          f"(median CPU {statistics.median(r[0] + r[1] for r in rows):.2f} s vs "
          f"{statistics.median(r[2] for r in rows):.2f} s; of which meshplan prepare "
          f"{statistics.median(r[0] for r in rows):.2f} s)")
    print(f"meshplan's own CPU time (outside torch's parallelize_module / fully_shard): median "
          f"{statistics.median(r[4] for r in rows):.3f} s = {statistics.median(r[5] for r in rows):.2%} of the torch "
          "calls it makes")
    print(f"identical layout (names, placements, local shapes): {same_layout}; per-rank elements "
          f"{rows[0][3][0]:,} (ideal total / 2048 shards = {total / 2048:,.0f})")


if __name__ == "__main__":
    main()
