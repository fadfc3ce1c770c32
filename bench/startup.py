"""Start-up cost of meshplan: ``import meshplan`` + ``list_strategies()`` over ``import torch``.

    .venv/bin/python bench/startup.py [--repeat 15] [--json]

Runs fresh interpreters, alternating between the two programs so that machine load hits both alike:

* ``torch``:    ``import torch``
* ``meshplan``: ``import torch; import meshplan; meshplan.list_strategies()``

and reports the median wall time of each process and the difference (goal: at most +50 ms). Each
``meshplan`` process also times its own part after ``import torch`` (no interpreter start-up noise);
that in-process median is the second figure. It also checks that neither ``transformers``,
``megatron_fsdp``, DTensor nor FSDP was imported.

The interpreters run with bytecode caching on (``PYTHONDONTWRITEBYTECODE`` removed from their environment;
the warm-up run writes the caches), as in any normal installation: without caches every run recompiles
every module of torch and meshplan, which measures the compiler, not the import.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

TORCH = "import torch"
MESHPLAN = (
    "import time, sys, json\n"
    "import torch\n"
    "t0 = time.perf_counter()\n"
    "import meshplan\n"
    "t1 = time.perf_counter()\n"
    "names = [s['name'] for s in meshplan.list_strategies()]\n"
    "t2 = time.perf_counter()\n"
    "heavy = [m for m in ('transformers', 'megatron_fsdp', 'torch.distributed.tensor', 'torch.distributed.fsdp')\n"
    "         if m in sys.modules]\n"
    "print(json.dumps({'inside_ms': (t2 - t0) * 1000, 'import_ms': (t1 - t0) * 1000, 'list_ms': (t2 - t1) * 1000,\n"
    "                  'strategies': names, 'heavy': heavy}))\n"
)


ENVIRONMENT = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def _wall(code: str) -> tuple[float, str]:
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=ENVIRONMENT).stdout
    return (time.perf_counter() - start) * 1000, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=15, help="processes of each kind (default 15)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    _wall(MESHPLAN)  # warm the file-system cache for both programs
    torch_ms, meshplan_ms, inside_ms, import_ms, list_ms = [], [], [], [], []
    details: dict = {}
    for _ in range(args.repeat):
        torch_ms.append(_wall(TORCH)[0])
        elapsed, out = _wall(MESHPLAN)
        meshplan_ms.append(elapsed)
        details = json.loads(out.strip().splitlines()[-1])
        inside_ms.append(details["inside_ms"])
        import_ms.append(details["import_ms"])
        list_ms.append(details["list_ms"])
    figures = {
        "repeat": args.repeat,
        "torch_ms": statistics.median(torch_ms),
        "torch_plus_meshplan_ms": statistics.median(meshplan_ms),
        "delta_ms": statistics.median(meshplan_ms) - statistics.median(torch_ms),
        "in_process_ms": statistics.median(inside_ms),
        "in_process_import_ms": statistics.median(import_ms),
        "in_process_list_strategies_ms": statistics.median(list_ms),
        "strategies": details["strategies"],
        "heavy_modules_imported": details["heavy"],
    }
    if args.json:
        print(json.dumps(figures, indent=2))
        return
    print(f"fresh processes, {args.repeat} of each, medians:")
    print(f"  import torch                                          {figures['torch_ms']:7.1f} ms")
    print(f"  import torch + import meshplan + list_strategies()    {figures['torch_plus_meshplan_ms']:7.1f} ms")
    print(f"  difference                                            {figures['delta_ms']:+7.1f} ms  (goal <= +50 ms)")
    print(f"  measured inside the process, after import torch       {figures['in_process_ms']:7.1f} ms"
          f"  (import meshplan {figures['in_process_import_ms']:.1f} ms, "
          f"list_strategies() {figures['in_process_list_strategies_ms']:.1f} ms)")
    print(f"  strategies listed: {', '.join(figures['strategies'])}; "
          f"heavy modules imported: {', '.join(figures['heavy_modules_imported']) or 'none'}")


if __name__ == "__main__":
    main()
