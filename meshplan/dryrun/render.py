"""Human-readable text for an explain report (the JSON report is the source of truth)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from ..tables import format_table, human_bytes, human_count


def _patterns(summary: list[dict[str, Any]]) -> str:
    return ", ".join((s["pattern"] or "(root)") + (f" ({s['count']})" if s["count"] > 1 else "") for s in summary)


def _model(model: Mapping[str, Any]) -> list[str]:
    overrides = ", ".join(f"{k}={v!r}" for k, v in model["overrides"].items())
    return [f"model     {model['name']}: {model['origin']} -> {model['class']}, {model['parameters']:,} parameters "
            f"({model['dtype']}, meta device)" + (f"; overrides {overrides}" if overrides else "")]


def _mesh(mesh: Mapping[str, Any]) -> list[str]:
    dims = " x ".join(f"{k}={v}" for k, v in mesh["dims"].items())
    where = ", ".join(f"{k}={v}" for k, v in mesh["coordinate"].items())
    lines = [f"mesh      {dims} = {mesh['world_size']:,} ranks; shards shown for rank {mesh['rank']} ({where})"]
    if mesh["roles"]:
        lines.append("          roles " + ", ".join(f"{role}={'+'.join(r['dims']) or '-'} ({r['size']})"
                                                    for role, r in mesh["roles"].items()))
    cp = mesh.get("context_parallel")
    if cp:
        lines.append(f"          context parallel: {cp['implementation']} over cp={cp['size']}, wrapping "
                     f"{cp['attention']!r} attention; sequence lengths must be multiples of {cp['sequence_multiple']}")
    return lines


def _option(value: Any) -> str:
    return json.dumps(value) if value is None or isinstance(value, (bool, list, dict)) else str(value)


def _strategy(strategy: Mapping[str, Any]) -> list[str]:
    lines = [f"strategy  {strategy['name']} from {strategy['provenance']}"]
    if strategy.get("options"):
        lines.append("          options " + ", ".join(f"{k}={_option(v)}" for k, v in strategy["options"].items()))
    return lines


def _entries(plan: Mapping[str, Any]) -> str:
    """A plan's entries as a table: key, style, matched modules."""
    rows = [{"key": e["key"], "style": e["style"], "modules": _patterns(e["modules"])} for e in plan["entries"]]
    return format_table(rows, (("key", "plan key"), ("style", "style"), ("modules", "matched modules")), indent="  ")


def _plan(plan: Mapping[str, Any] | None) -> list[str]:
    if plan is None:
        return ["plan      none (no tensor-parallel dim larger than 1)"]
    return [f"plan      {plan['source']}",
            f"          tp={plan['tp_size']}, sequence parallel: {'yes' if plan['sequence_parallel'] else 'no'}",
            _entries(plan)]


def _ep_plan(plan: Mapping[str, Any] | None) -> list[str]:
    if plan is None:
        return []
    return ["", f"ep plan   {plan['source']}", f"          ep={plan['ep_size']}", _entries(plan)]


def _replicated(replicated: Mapping[str, Any] | None, total: int) -> list[str]:
    """Matrices (2-D or more, any module type) that every TP/EP rank holds the same piece of."""
    if replicated is None:
        return []
    dims = " / ".join(replicated["dims"])
    if not replicated["count"]:
        return [f"  parameters whole on every {dims} rank: none (1-D norms and biases not counted)"]
    share = f" = {replicated['elements'] / total:.1%} of the model" if total else ""
    shown = ", ".join(f"{p['pattern']} [{'x'.join(map(str, p['shape']))}]"
                      + (f" ({p['count']})" if p["count"] > 1 else "")
                      + (f" over {'/'.join(p['over'])}" if len(replicated["dims"]) > 1 else "")
                      for p in replicated["parameters"])
    return [f"  parameters whole on every {dims} rank ({replicated['count']} tensors, "
            f"{human_count(replicated['elements'])} elements{share}): {shown}"]


def _units(units: list[dict[str, Any]]) -> list[str]:
    if not units:
        return ["FSDP units: none"]
    rows = [{
        "modules": (u["modules"] or "(root)") + (f" ({u['count']})" if u["count"] > 1 else ""),
        "class": u["class"],
        "params": human_count(u["parameters"]),
        "local": human_count(u["local_elements"]),
        "gathered": f"{human_bytes(u['gathered_bytes'])} {u['compute_dtype'] or ''}".strip(),
        "reduce": u["reduce_dtype"],
        "reshard": {True: "yes", False: "no", None: "?"}[u["reshard_after_forward"]],
    } for u in units]
    columns = (("modules", "module"), ("class", "class"), ("params", "params/unit"),
               ("local", "on this rank"), ("gathered", "all-gathered"), ("reduce", "reduce dtype"),
               ("reshard", "reshard after fwd"))
    return [f"FSDP units ({sum(u['count'] for u in units)})", format_table(rows, columns, indent="  ")]


def _over(value: float | None, ideal: float) -> str:
    return f"{value / ideal - 1:+.2%}" if ideal and value is not None else ""


def _memory(memory: Mapping[str, Any], rank: int) -> list[str]:
    params, b = memory["parameters"], memory["bytes"]
    worst = params.get("max_local_rank")
    if worst is None:
        worst_text = "worst rank not known (see notes)"
    else:
        where = ", ".join(f"{k}={v}" for k, v in (params.get("max_local_coordinate") or {}).items())
        worst_text = ("this is the worst rank" if worst == rank else
                      f"worst rank {worst}" + (f" ({where})" if where else "")
                      + f": {params['max_local']:,} ({params['max_local_overhead']:+.2%})")
    lines = [f"per-rank memory on rank {rank}: {params['local']:,} of {params['total']:,} parameter elements "
             f"({params['overhead']:+.2%}); {worst_text}; ideal {params['ideal_local']:,.0f} "
             f"(total / {params['shards']:,} shards)"]
    columns = [("what", ""), ("dtype", "dtype"), ("local", f"rank {rank}"), ("overhead", "overhead")]
    if worst is not None and worst != rank:
        columns += [("worst", f"worst (rank {worst})"), ("worst_overhead", "overhead")]
    columns.append(("ideal", "ideal"))
    rows = [{"what": label, "dtype": b[key].get("dtype"), "local": human_bytes(b[key]["local"]),
             "overhead": _over(b[key]["local"], b[key]["ideal"]),
             "worst": None if b[key].get("max_local") is None else human_bytes(b[key]["max_local"]),
             "worst_overhead": _over(b[key].get("max_local"), b[key]["ideal"]),
             "ideal": human_bytes(b[key]["ideal"])}
            for key, label in (("params", "parameters"), ("grads", "gradients"),
                               ("adamw", "AdamW state (2 moments + step)"), ("total", "total"))]
    lines.append(format_table(rows, columns, indent="  "))
    t = memory["transient"]
    if t["compute_dtype"] and t["peak_estimate_bytes"]:
        lines.append(f"  all-gathered units in {t['compute_dtype']}: {human_bytes(t['kept_unsharded_bytes'])} kept "
                     f"unsharded + 2 x {human_bytes(t['largest_unit_bytes'])} largest unit = "
                     f"{human_bytes(t['peak_estimate_bytes'])} peak (estimate, activations not included)")
    return lines


def _pipeline(pipeline: Mapping[str, Any] | None) -> list[str]:
    """Per-stage bytes, each pp rank's worst rank, and the schedule's bubble and peak in-flight microbatches."""
    if pipeline is None:
        return []
    lines = [f"pipeline  {pipeline['schedule']}, pp={pipeline['pp']}, {pipeline['microbatches']} microbatches, "
             f"{pipeline['stages_per_rank']} stage(s) per rank, split from {pipeline['layout']}; bubble "
             f"{pipeline['bubble_fraction']:.1%} (theory), peak {pipeline['peak_in_flight_microbatches']} "
             "microbatches in flight on pp rank 0"]
    rows = [{"stage": s["stage"], "rank": s["pp_rank"], "blocks": f"{s['blocks'][0]}-{s['blocks'][1] - 1}"
             if s["blocks"][1] > s["blocks"][0] else "-", "params": human_count(s["parameters"]),
             "pbytes": human_bytes(s["bytes"]["params"]), "gbytes": human_bytes(s["bytes"]["grads"]),
             "abytes": human_bytes(s["bytes"]["adamw"])} for s in pipeline["stages"]]
    lines.append(format_table(rows, (("stage", "stage"), ("rank", "pp rank"), ("blocks", "blocks"),
                                     ("params", "parameters"), ("pbytes", "param bytes"), ("gbytes", "grad bytes"),
                                     ("abytes", "AdamW bytes")), indent="  "))
    if pipeline["pp_ranks"]:
        rows = [{"rank": r["pp_rank"], "stages": ", ".join(map(str, r["stages"])), "worst": r["worst_rank"],
                 "local": f"{r['local']:,}", "total": human_bytes(r["bytes"]["total"])} for r in pipeline["pp_ranks"]]
        lines.append(format_table(rows, (("rank", "pp rank"), ("stages", "stages"), ("worst", "its worst rank"),
                                         ("local", "parameter elements"),
                                         ("total", "params + grads + AdamW")), indent="  "))
    return lines


def render_text(report: Mapping[str, Any]) -> str:
    """The report as sections of text; everything that ran before a failure is shown."""
    lines: list[str] = []
    if report.get("model"):
        lines += _model(report["model"])
    if report.get("mesh"):
        lines += _mesh(report["mesh"])
    if report.get("strategy"):
        lines += _strategy(report["strategy"])
    if report.get("memory") is not None:
        lines += [""] + _plan(report["plan"]) + _ep_plan(report.get("ep_plan"))
        lines += _replicated(report.get("replicated_parameters"), report["memory"]["parameters"]["total"])
        lines += [""] + _units(report["fsdp_units"]) + [""]
        pipeline = _pipeline(report.get("pipeline"))
        lines += pipeline + ([""] if pipeline else [])
        lines += _memory(report["memory"], report["mesh"]["rank"])
    for note in report.get("notes", ()):
        lines.append(f"note: {note}")
    if report.get("timings_s"):
        lines.append("time      " + ", ".join(f"{k} {v:.2f} s" for k, v in report["timings_s"].items())
                     + f" (total {sum(report['timings_s'].values()):.2f} s)")
    return "\n".join(lines)
