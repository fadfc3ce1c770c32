"""``meshplan explain`` on published mixture-of-experts shapes: the worst rank against the ideal, and the time.

    .venv/bin/python bench/explain_moe.py                     # the four cases of the MoE issue
    .venv/bin/python bench/explain_moe.py --case mixtral-8x7b:dp_shard=16,tp=8:8 --repeat 3

A case is ``PRESET:MESH[:EP]``. Each run is a fresh process that imports torch, transformers, the model
class and ``meshplan.dryrun`` before the clock starts, then calls ``meshplan.dryrun.explain``. It reports:

* ``max_local / ideal``: the most parameter elements any rank holds (``memory.parameters.max_local``, over
  every rank of the world) against the ideal share (total / shards); goal <= 1.05 with expert parallelism,
  <= 1.10 without;
* ``explain / torch``: explain's CPU time against the CPU time spent inside the torch calls it makes
  (building the model on the meta device, ``init_device_mesh``, ``parallelize_module``,
  ``distribute_module``, ``distribute_tensor``, ``fully_shard``; outermost call only), measured in the same
  run so the ratio does not depend on how busy the machine is; goal <= 3.

A case whose strategy rejects an option (``ep_size`` before expert parallelism exists) prints the error.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

CASES = (
    "mixtral-8x7b:dp_shard=16,tp=8",
    "mixtral-8x7b:dp_shard=16,tp=8:8",
    "qwen3-235b-a22b:dp_shard=32,tp=4:32",
    "deepseek-v3:dp_shard=256,tp=8:64",
)


class TorchCalls:
    """Accumulates CPU time inside the torch calls explain makes (outermost call only), patched where looked up."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0
        self._depth = 0
        self._saved: list[tuple[Any, str, Any]] = []

    def _timed(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            self._depth += 1
            start = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1
                if self._depth == 0:
                    self.seconds += time.process_time() - start
                    self.calls += 1
        return wrapper

    def patch(self, owner: Any, name: str, classmethod_: bool = False) -> None:
        original = owner.__dict__[name] if classmethod_ else getattr(owner, name)
        self._saved.append((owner, name, original))
        timed = self._timed(original.__func__ if classmethod_ else original)
        setattr(owner, name, classmethod(timed) if classmethod_ else timed)

    def __enter__(self) -> TorchCalls:
        import torch.distributed.device_mesh as device_mesh
        import torch.distributed.fsdp as fsdp
        import torch.distributed.tensor as tensor
        import torch.distributed.tensor.parallel as parallel
        from transformers import PreTrainedModel

        import meshplan.dryrun.meshspec as meshspec

        for owner, name in ((parallel, "parallelize_module"), (fsdp, "fully_shard"), (tensor, "distribute_tensor"),
                            (tensor, "distribute_module"), (device_mesh, "init_device_mesh"),
                            (meshspec, "init_device_mesh")):
            self.patch(owner, name)
        self.patch(PreTrainedModel, "_from_config", classmethod_=True)
        return self

    def __exit__(self, *exc: object) -> None:
        for owner, name, original in reversed(self._saved):
            setattr(owner, name, original)


def _child(preset: str, mesh: str, ep: int | None) -> dict[str, Any]:
    import transformers

    from meshplan.dryrun import explain
    from meshplan.dryrun.modelsource import resolve_source

    logging.disable(logging.WARNING)  # the HF fallback's warnings are not what is measured
    getattr(transformers, resolve_source(preset).config["architectures"][0])
    with TorchCalls() as torch_calls:
        start = time.process_time()
        report = explain(preset, mesh, ep_size=ep, raise_errors=False)
        seconds = time.process_time() - start
    params = (report.get("memory") or {}).get("parameters") or {}
    return {"preset": preset, "mesh": mesh, "ep": ep, "error": report["error"], "seconds": seconds,
            "torch_seconds": torch_calls.seconds, "torch_calls": torch_calls.calls,
            "phases": report["timings_s"], "total": params.get("total"), "local": params.get("local"),
            "max_local": params.get("max_local"), "max_local_rank": params.get("max_local_rank"),
            "ideal": params.get("ideal_local"), "shards": params.get("shards"),
            "replicated": (report.get("replicated_parameters") or {}).get("elements"),
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}


def _parse(case: str) -> tuple[str, str, int | None]:
    preset, mesh, *ep = case.split(":")
    return preset, mesh, int(ep[0]) if ep and ep[0] else None


def _run(case: str) -> dict[str, Any]:
    out = subprocess.run([sys.executable, __file__, "--child", case], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _row(case: str, runs: list[dict[str, Any]]) -> str:
    first = runs[0]
    label = f"{first['preset']} {first['mesh']}" + (f" ep={first['ep']}" if first["ep"] else "")
    if first["error"]:
        error = first["error"]
        return f"{label}\n    error in {error['phase']}: {error['type']}: {error['message'][:160]}"
    goal = 1.05 if first["ep"] else 1.10
    ratio = first["max_local"] / first["ideal"]
    seconds = statistics.median(r["seconds"] for r in runs)
    torch_seconds = statistics.median(r["torch_seconds"] for r in runs)
    return (f"{label}\n"
            f"    max_local {first['max_local']:,} on rank {first['max_local_rank']} (rank 0: {first['local']:,}); "
            f"ideal {first['ideal']:,.0f} = {first['total']:,} / {first['shards']:,}: "
            f"{ratio:.3f} x ideal (goal <= {goal:.2f}: {'met' if ratio <= goal else 'NOT met'}); "
            f"whole on every TP/EP rank: {first['replicated'] or 0:,} elements\n"
            f"    explain {seconds:.2f} s CPU vs {torch_seconds:.2f} s in {first['torch_calls']} torch calls: "
            f"{seconds / torch_seconds:.2f}x (goal <= 3: {'met' if seconds <= 3 * torch_seconds else 'NOT met'}); "
            f"peak RSS {max(r['peak_rss_gb'] for r in runs):.2f} GB; phases "
            + ", ".join(f"{k} {v:.2f}" for k, v in first["phases"].items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", action="append", help="PRESET:MESH[:EP] (repeatable; default: the issue's four)")
    parser.add_argument("--repeat", type=int, default=1, help="fresh processes per case (medians of the times)")
    parser.add_argument("--json", action="store_true", help="print the raw results as JSON as well")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(*_parse(args.child))))
        return
    results = {}
    for case in args.case or CASES:
        results[case] = [_run(case) for _ in range(args.repeat)]
        print(_row(case, results[case]), flush=True)
    if args.json:
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
