"""Pipeline parallelism vs. FSDP on 2 gloo ranks (CPU): a small Llama (8 layers, fp32, SGD), the same global
batch per step. ``pp=2`` (1F1B, 8 microbatches) vs ``dp_shard=2``: step time, parameter bytes per rank, and the
pipeline's measured bubble (1 - time inside its stages' forward and backward / step time) next to the schedule's
theoretical one.

    .venv/bin/python bench/pipeline.py
    .venv/bin/python bench/pipeline.py --steps 8 --layers 8 --hidden 256 --seq 128 --batch 16
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _model(layers: int, hidden: int):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                                  num_attention_heads=8, num_key_value_heads=4, vocab_size=1024,
                                  max_position_embeddings=1024, tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


class BusyClock:
    """Time this rank's pipeline stages spend computing: inside their ``forward_one_chunk`` /
    ``backward_one_chunk`` / ``backward_weight_one_chunk`` (the schedule's compute actions; sends, receives
    and waiting are outside them)."""

    ACTIONS = ("forward_one_chunk", "backward_one_chunk", "backward_weight_one_chunk")

    def __init__(self, schedule) -> None:
        self.busy = 0.0
        stages = getattr(schedule, "_stages", None) or [schedule._stage]
        for stage in stages:
            for action in self.ACTIONS:
                setattr(stage, action, self._timed(getattr(stage, action)))

    def _timed(self, method):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.busy += time.perf_counter() - start
        return timed


def _param_bytes(model) -> int:
    from torch.distributed.tensor import DTensor

    return sum((p.to_local() if isinstance(p, DTensor) else p).nbytes for p in model.parameters())


def _run(layout: str, args: dict[str, Any]) -> dict[str, Any]:
    """On every rank: parallelize, time ``steps`` SGD steps after one warm-up step."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy

    import meshplan

    torch.set_num_threads(1)
    fp32 = MixedPrecisionPolicy()
    model = _model(args["layers"], args["hidden"])
    batch, seq = args["batch"], args["seq"]
    generator = torch.Generator().manual_seed(1)
    data = torch.randint(0, 1024, (batch, seq), generator=generator)
    if layout == "pp":
        mesh = init_device_mesh("cpu", (2, 1), mesh_dim_names=("pp", "dp_shard"))
        pipe = meshplan.parallelize(model, mesh, pp_schedule="1F1B", pp_microbatches=args["microbatches"],
                                    mp_policy=fp32)
        clock = BusyClock(pipe.schedule)

        def step() -> None:
            pipe.step(input_ids=data, labels=data)
        target = pipe
    else:
        mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("dp_shard",))
        target = meshplan.parallelize(model, mesh, mp_policy=fp32)
        clock = None
        local = data[dist.get_rank() * batch // 2:(dist.get_rank() + 1) * batch // 2]

        def step() -> None:
            target(input_ids=local, labels=local).loss.backward()
    optimizer = torch.optim.SGD(target.parameters(), lr=1e-3)
    times, busy = [], []
    for index in range(args["steps"] + 1):
        dist.barrier()
        if clock is not None:
            clock.busy = 0.0
        start = time.perf_counter()
        step()
        optimizer.step()
        optimizer.zero_grad()
        elapsed = time.perf_counter() - start
        if index:  # the first step warms up (and infers the pipeline's shapes)
            times.append(elapsed)
            busy.append(clock.busy if clock is not None else elapsed)
    return {"step": statistics.median(times), "busy": statistics.median(busy), "bytes": _param_bytes(target)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16, help="global batch (sequences per step)")
    parser.add_argument("--microbatches", type=int, default=8)
    args = vars(parser.parse_args())

    from meshplan.pipeline.schedules import bubble_fraction
    from meshplan.plugins.testing import RankPool

    pool = RankPool(2)
    try:
        pp = pool.run(_run, "pp", args, timeout=1800)
        fsdp = pool.run(_run, "fsdp", args, timeout=1800)
    finally:
        pool.close()
    pp_step = max(r["step"] for r in pp)
    fsdp_step = max(r["step"] for r in fsdp)
    measured = [1 - r["busy"] / r["step"] for r in pp]
    theory = bubble_fraction("1F1B", 2, args["microbatches"])
    print(f"Llama {args['layers']} layers, hidden {args['hidden']}, {args['batch']} x {args['seq']} tokens per step, "
          f"2 gloo ranks, fp32")
    print(f"step time      pp=2 (1F1B, {args['microbatches']} microbatches) {pp_step:.3f} s | dp_shard=2 "
          f"{fsdp_step:.3f} s | ratio {pp_step / fsdp_step:.2f}x")
    print(f"param bytes    pp=2 {[r['bytes'] for r in pp]} | dp_shard=2 {[r['bytes'] for r in fsdp]} | ratio "
          f"{max(r['bytes'] for r in pp) / max(r['bytes'] for r in fsdp):.2f}x (worst rank)")
    print(f"bubble         measured per rank {[round(m, 3) for m in measured]} | theoretical {theory:.3f}")


if __name__ == "__main__":
    main()
