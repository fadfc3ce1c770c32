"""The ``meshplan`` command line: plugin/strategy/plan listings (tables or ``--json``) and subcommands."""

from __future__ import annotations

import argparse
import ast
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..core.errors import MeshplanError, OptionsError, PlanSourceError
from ..tables import format_table


def _plugins_rows() -> list[dict[str, Any]]:
    from ..api import list_plugins  # loaded on use: keeps start-up light

    rows = list_plugins()
    for row in rows:
        row["provides"] = ", ".join(f"{c['kind']}:{c['key']}" for c in row["contributions"])
    return rows


def _strategies_rows() -> list[dict[str, Any]]:
    from ..api import list_strategies  # loaded on use: keeps start-up light

    rows = list_strategies()
    for row in rows:
        row["aliases_text"] = ", ".join(row["aliases"])
        row["available"] = "yes" if not row.get("unavailable_reason") else f"no: {row['unavailable_reason']}"
        row["options_text"] = ", ".join(f"{o['name']}={o['default']}" for o in row.get("options", []))
    return rows


def _plans_rows() -> list[dict[str, Any]]:
    from ..api import list_tp_plans  # loaded on use: keeps start-up light

    return list_tp_plans()


def _presets_rows() -> list[dict[str, Any]]:
    from ..dryrun.modelsource import list_presets  # loaded on use: keeps start-up light

    return list_presets()


def _styles_rows() -> list[dict[str, Any]]:
    from ..api import list_styles  # loaded on use: keeps start-up light

    return list_styles()


LISTINGS: dict[str, tuple[str, Callable[[], list[dict[str, Any]]], Sequence[tuple[str, str]]]] = {
    "plugins": ("installed plugins and what they provide", _plugins_rows, (
        ("name", "plugin"), ("source", "source"), ("status", "status"), ("distribution", "distribution"),
        ("version", "version"), ("provides", "provides"), ("error", "error"))),
    "strategies": ("registered parallel strategies", _strategies_rows, (
        ("name", "strategy"), ("aliases_text", "aliases"), ("plugin", "plugin"), ("status", "status"),
        ("available", "available here"), ("options_text", "options (defaults)"))),
    "plans": ("registered tensor-parallel plan providers", _plans_rows, (
        ("model_class", "model class"), ("target", "provider"), ("plugin", "plugin"), ("status", "status"))),
    "styles": ("registered parallel-style names", _styles_rows, (
        ("name", "style"), ("target", "factory"), ("plugin", "plugin"), ("status", "status"))),
    "presets": ("built-in model presets (published config.json shapes) for explain and demo", _presets_rows, (
        ("name", "preset"), ("model_type", "model_type"), ("architecture", "architecture"), ("source", "shape of"))),
}


def _run_listing(name: str, as_json: bool) -> int:
    _, rows_fn, columns = LISTINGS[name]
    rows = rows_fn()
    if as_json:
        print(json.dumps(rows, indent=2, default=str))
    else:
        print(format_table(rows, columns))
    return 0


def parse_value(text: str) -> Any:
    """A command-line value: JSON or a Python literal (``4``, ``false``, ``None``, ``[1, 2]``), else the string."""
    for parse in (json.loads, ast.literal_eval):
        try:
            return parse(text)
        except (ValueError, SyntaxError):
            continue
    return text


def parse_assignments(items: Sequence[str] | None, what: str) -> dict[str, Any]:
    """``["a=1", "b.c=x"]`` -> ``{"a": 1, "b.c": "x"}``; a malformed item raises :class:`OptionsError`."""
    result: dict[str, Any] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise OptionsError(f"Bad {what} {item!r}: expected key=value.")
        result[key.strip()] = parse_value(value.strip())
    return result


def load_tp_plan(value: str | None) -> Any:
    """``--tp-plan``: a JSON file of ``{module pattern: style name}``, else a dotted path given to meshplan."""
    if value is None or not value.endswith(".json"):
        return value
    try:
        plan = json.loads(Path(value).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PlanSourceError(f"Cannot read the TP plan {value!r}: {exc}") from exc
    if not isinstance(plan, dict):
        raise PlanSourceError(f"The TP plan {value!r} must hold a JSON object {{module pattern: style name}}.")
    return plan


def _add_explain_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="config.json path or folder, preset name (`meshplan presets`) or model_type")
    p.add_argument("--mesh", required=True, help="dims outermost first, e.g. dp_replicate=8,dp_shard=256,tp=8")
    p.add_argument("--strategy", default="fsdp2", help="registered strategy name (default: fsdp2)")
    p.add_argument("--sequence-parallel", action="store_true", help="use the plan's sequence-parallel variant")
    p.add_argument("--tp-plan", metavar="PATH", help="a JSON plan file, or a dotted path to a plan or function")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override (dotted keys nest)")
    p.add_argument("-o", "--option", action="append", metavar="NAME=VALUE", help="a strategy option")
    p.add_argument("--ep", type=int, metavar="N", help="expert-parallel size: the strategy's ep_size option")
    p.add_argument("--precision", default="bf16-mixed", choices=("bf16-mixed", "fp32", "bf16"),
                   help="bf16-mixed: fp32 weights, the strategy's bf16 compute (default); fp32; bf16 weights")
    p.add_argument("--rank", type=int, default=0, help="the rank whose shards are shown (default 0)")
    p.add_argument("--json", action="store_true", help="machine-readable report (schema: docs/explain.md)")
    p.add_argument("--timings", action="store_true",
                   help="keep the run-dependent timings_s in --json output (left out so reports diff cleanly)")


def _run_explain(args: argparse.Namespace) -> int:
    from ..dryrun import explain, render_text  # loaded on use: keeps start-up light

    report = explain(
        args.model, args.mesh, args.strategy, tp_plan=load_tp_plan(args.tp_plan),
        sequence_parallel=args.sequence_parallel, overrides=parse_assignments(args.set, "--set"),
        options=parse_assignments(args.option, "--option"), precision=args.precision, rank=args.rank,
        ep_size=args.ep, raise_errors=False,
    )
    if args.json:
        shown = report if args.timings else {k: v for k, v in report.items() if k != "timings_s"}
        print(json.dumps(shown, indent=2, default=str))
    else:
        print(render_text(report))
    error = report["error"]
    if error is None:
        return 0
    print(f"meshplan: error in {error['phase']}: {error['type']}: {error['message']}", file=sys.stderr)
    return int(error["exit_code"])


def _add_demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nproc", type=int, default=2, help="local ranks to launch (ignored under torchrun)")
    p.add_argument("--strategy", default="fsdp2", help="registered strategy name (default: fsdp2)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    p.add_argument("--dp-replicate", type=int, default=1, help="replicas (HSDP); the rest shards data parallel")
    p.add_argument("--cp", type=int, default=1, help="context-parallel size: every sequence split over cp ranks")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size: the model split into pp stages")
    p.add_argument("--pp-schedule", default="1F1B", help="torch pipeline schedule with --pp > 1 (default 1F1B)")
    p.add_argument("--sequence-parallel", action="store_true", help="use the plan's sequence-parallel variant")
    p.add_argument("--activation-checkpointing", nargs="?", const=True, default=False, type=parse_value,
                   metavar="MODE", help="recompute activations in backward (MODE: mlp, full, selective)")
    p.add_argument("--steps", type=int, default=20, help="training steps (default 20)")
    p.add_argument("--model", default="tiny-llama", help="preset, config.json or model_type (default tiny-llama)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override (dotted keys nest)")
    p.add_argument("-o", "--option", action="append", metavar="NAME=VALUE", help="a strategy option")
    p.add_argument("--batch-size", type=int, default=8, help="global batch size in sequences (default 8)")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per sequence (default 64)")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (default 3e-3)")
    p.add_argument("--seed", type=int, default=0, help="seed of weights and data (default 0)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto (default): CUDA with NCCL when GPUs exist, else CPU with gloo")


def _run_demo(args: argparse.Namespace) -> int:
    # loaded on use: keeps start-up light
    from .demo import DemoConfig
    from .demo import main as demo_main

    config = DemoConfig(
        nproc=args.nproc, strategy=args.strategy, tp=args.tp, dp_replicate=args.dp_replicate, cp=args.cp,
        pp=args.pp, pp_schedule=args.pp_schedule,
        sequence_parallel=args.sequence_parallel, activation_checkpointing=args.activation_checkpointing,
        steps=args.steps, model=args.model, overrides=parse_assignments(args.set, "--set"),
        options=parse_assignments(args.option, "--option"), batch_size=args.batch_size, seq_len=args.seq_len,
        lr=args.lr, seed=args.seed, device=args.device,
    )
    return demo_main(config)


#: Subcommands beyond the listings: name -> (help, add-arguments, run). Their modules are imported only
#: when they run, so the listings stay light. Other modules may add entries.
SUBCOMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "explain": ("dry-run parallelize for a model and mesh of any size (meta device, fake ranks)",
                _add_explain_arguments, _run_explain),
    "demo": ("train a small model on local ranks with a strategy (self-launching, or under torchrun)",
             _add_demo_arguments, _run_demo),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshplan", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, _, _) in LISTINGS.items():
        p = sub.add_parser(name, help=f"list {help_text}")
        p.add_argument("--json", action="store_true", help="machine-readable output")
    for name, (help_text, add_arguments, _) in _subcommands().items():
        add_arguments(sub.add_parser(name, help=help_text))
    return parser


def _subcommands() -> dict[str, tuple[str, Callable[[argparse.ArgumentParser], None],
                                      Callable[[argparse.Namespace], int]]]:
    """Subcommands beyond the listings, imported lazily so listings stay fast."""
    return dict(SUBCOMMANDS)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command in LISTINGS:
            return _run_listing(args.command, args.json)
        return _subcommands()[args.command][2](args)
    except MeshplanError as exc:
        print(f"meshplan: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
