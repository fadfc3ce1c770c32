"""Conformance sweep: TP=2 forward + backward parity of every causal-LM model type that declares a transformers
TP plan, on 2 gloo ranks (CPU), against the same model in one process.

    .venv/bin/python bench/conformance.py --output docs/conformance.md --json conformance.json
    .venv/bin/python bench/conformance.py --only llama,mixtral

Every model type is one task on the same two rank processes (a ``RankPool``), so imports and the process group
are paid once. A task that times out, or leaves the ranks in disagreement, restarts the pool and the sweep
goes on. The per-architecture check lives in ``tests/conformance_check.py`` (the CI subset test uses it too).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # spawned ranks inherit sys.path, so they import tests.conformance_check too

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

WORLD_SIZE = 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="comma-separated model types to check (default: every type with a TP plan)")
    parser.add_argument("--limit", type=int, help="check only the first N model types")
    parser.add_argument("--output", type=Path, help="write the markdown report here (e.g. docs/conformance.md)")
    parser.add_argument("--json", type=Path, help="write the per-type results as JSON here")
    parser.add_argument("--timeout", type=float, default=240.0,
                        help="seconds one model type may take before the ranks are restarted (default 240)")
    return parser.parse_args(argv)


def select_types(args: argparse.Namespace) -> list[str]:
    from tests.conformance_check import model_types_with_tp_plan

    types = model_types_with_tp_plan()
    if args.only:
        wanted = [t.strip() for t in args.only.split(",") if t.strip()]
        unknown = [t for t in wanted if t not in types]
        if unknown:
            raise SystemExit(f"not causal-LM model types with a TP plan: {unknown}")
        types = wanted
    return types[:args.limit] if args.limit else types


def _failure(model_type: str, reason: str, seconds: float) -> dict[str, Any]:
    return {"model_type": model_type, "status": "fail", "reason": reason, "stage": "harness", "seconds": seconds}


def run_sweep(types: list[str], timeout: float, log=print) -> list[dict[str, Any]]:
    """Check each model type on one persistent 2-rank pool; a hang or a crash restarts the pool."""
    from meshplan.plugins.testing import RankError, RankPool
    from tests.conformance_check import check_architecture, merge_rank_results

    pool = RankPool(WORLD_SIZE)
    results = []
    try:
        for index, model_type in enumerate(types, 1):
            if not pool.alive:
                pool.close(force=True)
                pool = RankPool(WORLD_SIZE)
            start = time.perf_counter()
            restart = False
            try:
                result = merge_rank_results(pool.run(check_architecture, model_type, timeout=timeout))
                restart = result["reason"].startswith("ranks disagree")
            except TimeoutError:
                result = _failure(model_type, f"harness: timed out after {timeout:.0f} s (ranks restarted)",
                                  time.perf_counter() - start)
                restart = True
            except RankError as exc:
                head = " ".join(str(exc).split("\n---")[0].split())[:240]
                result = _failure(model_type, f"harness: {head}", time.perf_counter() - start)
                restart = True
            result.pop("traceback", None) if result["status"] == "pass" else None
            results.append(result)
            log(f"[{index}/{len(types)}] {model_type:28s} {result['status']:4s} {result['seconds']:6.1f}s  "
                f"{result['reason']}", flush=True)
            if restart:
                pool.close(force=True)
                pool = RankPool(WORLD_SIZE)
    finally:
        pool.close(force=not pool.alive)
    return results


def machine_description() -> str:
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{os.cpu_count()} CPU cores ({cpu}), {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}")


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _details(result: dict[str, Any]) -> str:
    if result["status"] == "pass":
        return (f"logits {result.get('logits_error', 0):.1e}, grads {result.get('grad_error', 0):.1e} "
                f"(max rel. error)")
    return result["reason"]


def _source(result: dict[str, Any]) -> str:
    source = result.get("plan_source") or ""
    if not source:
        return ""
    return "built-in" if "meshplan.plans.hf" not in source else "HF fallback"


def render_markdown(results: list[dict[str, Any]], meta: dict[str, Any], notes: str = "") -> str:
    passed = sum(r["status"] == "pass" for r in results)
    lines = [
        "# TP plan conformance sweep",
        "",
        "Every causal-LM model type of the installed transformers whose config declares a TP plan "
        "(`base_model_tp_plan` on the config or a sub-config, or a class `_tp_plan`) is built from a tiny config "
        "with random weights and run once unsharded and once with tensor parallelism of size 2 on 2 gloo ranks "
        "(CPU, fp32), with the plan `meshplan.parallelize` resolves and validates (a test-only strategy that "
        "applies only TP). A model type passes when the logits and every gathered parameter gradient match the "
        f"single-process reference within {meta['rtol']:g} relative to the reference tensor's max |value| "
        f"(gradients: to max(own max |g|, {meta['grad_floor']:g} x the model's largest |g|), since some are "
        "analytically zero and then only rounding noise). "
        "`sharded` is the fraction of parameter elements that TP shards.",
        "",
        "| model type | result | reason | plan | sharded | seconds |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        sharded = f"{r['sharded_fraction']:.0%}" if "sharded_fraction" in r else ""
        lines.append(f"| {r['model_type']} | {r['status']} | {_cell(_details(r))} | {_source(r)} | {sharded} | "
                     f"{r.get('seconds', 0):.1f} |")
    lines += [
        "",
        f"**Totals:** {passed} pass, {len(results) - passed} fail of {len(results)} model types "
        f"({passed / max(len(results), 1):.1%} pass).",
        "",
    ]
    if notes:
        lines += [notes.strip(), ""]
    lines += [
        f"- Date: {meta['date']}",
        f"- Machine: {meta['machine']}; load average {meta['load_before']} before, {meta['load_after']} after "
        "(the machine is shared, so times vary)",
        f"- Wall time: {meta['wall_seconds']:.0f} s for the whole sweep",
        f"- Command: `{meta['command']}`",
        "",
    ]
    return "\n".join(lines)


def _load() -> str:
    try:
        return " / ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


NOTES_MARKER = "<!-- notes -->"


def _existing_notes(path: Path | None) -> str:
    """Hand-written notes below the marker in an existing report are kept when it is rewritten."""
    if path is None or not path.exists():
        return ""
    text = path.read_text()
    if NOTES_MARKER not in text:
        return ""
    return NOTES_MARKER + text.split(NOTES_MARKER, 1)[1].split("\n- Date:", 1)[0].rstrip()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from tests.conformance_check import GRAD_FLOOR, RTOL

    types = select_types(args)
    print(f"checking {len(types)} model types on {WORLD_SIZE} gloo ranks", flush=True)
    load_before, start = _load(), time.perf_counter()
    results = run_sweep(types, args.timeout)
    wall = time.perf_counter() - start
    meta = {
        "date": datetime.date.today().isoformat(), "machine": machine_description(), "load_before": load_before,
        "load_after": _load(), "wall_seconds": wall, "rtol": RTOL, "grad_floor": GRAD_FLOOR,
        "command": " ".join(shlex.quote(a) for a in [".venv/bin/python", "bench/conformance.py",
                                                      *(sys.argv[1:] if argv is None else argv)]),
    }
    passed = sum(r["status"] == "pass" for r in results)
    print(f"{passed}/{len(results)} pass in {wall:.0f} s", flush=True)
    if args.output:
        notes = _existing_notes(args.output)
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(render_markdown(results, meta, notes))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
