"""``meshplan explain`` at scale against the bare torch calls it wraps, in fresh processes.

    .venv/bin/python bench/explain_scale.py                       # Llama-3-405B on 8 x 256 x 8 = 16,384 ranks
    .venv/bin/python bench/explain_scale.py --model llama3-70b --mesh dp_replicate=8,dp_shard=16,tp=8
    .venv/bin/python bench/explain_scale.py --mesh dp_replicate=8,dp_shard=2048,tp=8 --no-bare --repeat 1  # 131,072
    .venv/bin/python bench/explain_scale.py --acceptance --repeat 1  # the pipeline issue's two explain figures

Each repetition runs two child processes, alternating: ``bare`` builds the model on the meta device,
a fake process group and the mesh, then calls ``parallelize_module`` with a hand-written Llama plan
and ``fully_shard`` on every decoder layer and the root; ``explain`` calls
``meshplan.dryrun.explain`` (model build, mesh, strategy lookup, plan resolution and validation,
the fsdp2 strategy, and the report). Imports (torch, transformers, the model class) are done before
the clock starts in both. Prints medians, the ratio (goal: explain <= 3x bare) and whether both
count the same parameter elements on rank 0. ``--no-bare`` runs explain alone (time and peak RSS), e.g. at
131,072 ranks, where the bare calls keep a tuple of every rank per ``DeviceMesh`` (gigabytes; explain shares one).
``--acceptance`` runs explain alone on the two figures the pipeline issue asks for, each against its goal:
Llama-3-405B on 131,072 ranks (time and peak RSS) and on ``dp_shard=128,pp=16,tp=8`` (worst rank / ideal).
Every explain-only line ends with the 1-minute load average before and after the runs (the machine is shared).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time


def _bare(model: str, mesh_spec: str) -> dict:
    import torch
    import torch.distributed as dist
    import transformers
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    from meshplan.dryrun.modelsource import resolve_source

    data = resolve_source(model).config
    config = transformers.CONFIG_MAPPING[data["model_type"]].from_dict(data)
    cls = getattr(transformers, data["architectures"][0])
    dims = {k: int(v) for k, v in (p.split("=") for p in mesh_spec.split(","))}
    start = time.perf_counter()
    with torch.device("meta"):
        net = cls._from_config(config, dtype=torch.float32)
    world = 1
    for size in dims.values():
        world *= size
    dist.init_process_group("fake", rank=0, world_size=world)
    mesh = init_device_mesh("cpu", tuple(dims.values()), mesh_dim_names=tuple(dims))
    built = time.perf_counter()
    colwise = {"input_layouts": Replicate(), "output_layouts": Shard(-1)}
    plan = {"model.embed_tokens": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
            "lm_head": ColwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())}
    for index in range(len(net.model.layers)):
        prefix = f"model.layers.{index}"
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
            plan[f"{prefix}.{name}"] = ColwiseParallel(**colwise)
        for name in ("self_attn.o_proj", "mlp.down_proj"):
            plan[f"{prefix}.{name}"] = RowwiseParallel(input_layouts=Shard(-1), output_layouts=Replicate())
    tp_mesh = mesh["tp"]
    for fqn, style in plan.items():
        parallelize_module(net.get_submodule(fqn), tp_mesh, style)
    tp_done = time.perf_counter()
    dp_mesh = mesh["dp_replicate", "dp_shard"] if "dp_replicate" in dims else mesh["dp_shard"]
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in net.model.layers:
        fully_shard(layer, mesh=dp_mesh, mp_policy=policy)
    fully_shard(net, mesh=dp_mesh, reshard_after_forward=False, mp_policy=MixedPrecisionPolicy(
        param_dtype=torch.bfloat16, reduce_dtype=torch.float32, output_dtype=torch.float32))
    end = time.perf_counter()
    local = sum(p.to_local().numel() for p in net.parameters())
    return {"seconds": end - start, "build_mesh": built - start, "tp": tp_done - built, "fsdp": end - tp_done,
            "local_elements": local}


def _explain(model: str, mesh_spec: str) -> dict:
    import transformers  # noqa: F401 - imported before the clock, like the bare child

    from meshplan.dryrun import explain
    from meshplan.dryrun.modelsource import resolve_source

    getattr(transformers, resolve_source(model).config["architectures"][0])
    start, cpu = time.perf_counter(), time.process_time()
    report = explain(model, mesh_spec)
    end = time.perf_counter()
    return {"seconds": end - start, "cpu_seconds": time.process_time() - cpu,
            **{f"phase_{k}": v for k, v in report["timings_s"].items()},
            "local_elements": report["memory"]["parameters"]["local"],
            "max_local": report["memory"]["parameters"]["max_local"],
            "max_local_rank": report["memory"]["parameters"]["max_local_rank"],
            "ideal_elements": report["memory"]["parameters"]["ideal_local"]}


def _child(kind: str, model: str, mesh: str) -> None:
    result = (_bare if kind == "bare" else _explain)(model, mesh)
    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print(json.dumps(result))


#: (what, model, mesh, goal seconds, goal peak RSS in GB, goal worst rank / ideal): the pipeline issue's figures.
ACCEPTANCE = (
    ("131,072 ranks", "llama3-405b", "dp_replicate=8,dp_shard=2048,tp=8", 30.0, 2.0, None),
    ("16,384 ranks with pp", "llama3-405b", "dp_shard=128,pp=16,tp=8", None, None, 1.05),
)


def _load() -> str:
    return f"{os.getloadavg()[0]:.1f}"


def _goal(value: float, goal: float | None) -> str:
    return "" if goal is None else f" (goal <= {goal:g}: {'met' if value <= goal else 'NOT met'})"


def _explain_only(label: str, model: str, mesh: str, repeat: int, goal_seconds: float | None = None,
                  goal_gb: float | None = None, goal_ratio: float | None = None) -> None:
    """Fresh explain processes only: median time, CPU, peak RSS and the worst rank over all ranks / ideal."""
    before = _load()
    runs = [_run("explain", model, mesh) for _ in range(repeat)]
    seconds = statistics.median(r["seconds"] for r in runs)
    peak = max(r["peak_rss_gb"] for r in runs)
    worst = runs[0]
    ratio = worst["max_local"] / worst["ideal_elements"]
    print(f"{label}: {model} on {mesh} ({repeat} run{'s' if repeat != 1 else ''}, medians)\n"
          f"  meshplan explain (everything + report): {seconds:6.2f} s{_goal(seconds, goal_seconds)}   "
          f"({statistics.median(r['cpu_seconds'] for r in runs):.2f} s CPU)   "
          f"peak RSS {peak:.2f} GB{_goal(peak, goal_gb)}\n"
          f"  worst rank over all ranks: {worst['max_local']:,} on rank {worst['max_local_rank']} = {ratio:.4f} x the "
          f"ideal {worst['ideal_elements']:,.0f}{_goal(ratio, goal_ratio)}\n"
          "  phases: " + ", ".join(f"{k[6:]} {statistics.median(r[k] for r in runs):.2f} s"
                                   for k in runs[0] if k.startswith("phase_")) + "\n"
          f"  load average (1 min) {before} before, {_load()} after", flush=True)


def _run(kind: str, model: str, mesh: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", kind, "--model", model, "--mesh", mesh],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama3-405b")
    parser.add_argument("--mesh", default="dp_replicate=8,dp_shard=256,tp=8")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-bare", action="store_true", help="run only explain (time and peak RSS)")
    parser.add_argument("--acceptance", action="store_true", help="the pipeline issue's two explain figures")
    parser.add_argument("--child", choices=("bare", "explain"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child, args.model, args.mesh)
        return
    if args.acceptance:
        for label, model, mesh, seconds, gb, ratio in ACCEPTANCE:
            _explain_only(label, model, mesh, args.repeat, seconds, gb, ratio)
        return
    if args.no_bare:
        _explain_only("explain only", args.model, args.mesh, args.repeat)
        return
    runs: dict[str, list[dict]] = {"bare": [], "explain": []}
    for _ in range(args.repeat):
        for kind in runs:
            runs[kind].append(_run(kind, args.model, args.mesh))
    explained = statistics.median(r["seconds"] for r in runs["explain"])
    print(f"{args.model} on {args.mesh} ({args.repeat} runs each, medians)")
    bare = statistics.median(r["seconds"] for r in runs["bare"])
    print(f"  bare torch calls (build, mesh, TP, FSDP): {bare:6.2f} s   "
          f"peak RSS {max(r['peak_rss_gb'] for r in runs['bare']):.2f} GB")
    print(f"  meshplan explain (everything + report):   {explained:6.2f} s   "
          f"peak RSS {max(r['peak_rss_gb'] for r in runs['explain']):.2f} GB")
    print(f"  ratio {explained / bare:.2f}x (goal <= 3x)")
    phases = {k: statistics.median(r[k] for r in runs["explain"]) for k in runs["explain"][0] if k.startswith("phase_")}
    print("  explain phases: " + ", ".join(f"{k[6:]} {v:.2f} s" for k, v in phases.items()))
    local_bare, local_explain = runs["bare"][0]["local_elements"], runs["explain"][0]["local_elements"]
    print(f"  rank-0 parameter elements: bare {local_bare:,}, explain {local_explain:,} "
          f"({'equal' if local_bare == local_explain else 'DIFFERENT'}); "
          f"ideal {runs['explain'][0]['ideal_elements']:,.0f}")
    worst = runs["explain"][0]
    print(f"  worst rank over all ranks (explain): {worst['max_local']:,} on rank {worst['max_local_rank']} "
          f"({worst['max_local'] / worst['ideal_elements']:.4f} x ideal)")


if __name__ == "__main__":
    main()
