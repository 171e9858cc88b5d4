"""`moeify inspect`: what a checkpoint holds, or what a conversion would make of it, from config.json alone.

Examples:

    moeify inspect mistral-7b                                   # 7.24B dense, FFN share, sizes
    moeify inspect mistral-7b --experts 8 --topk 2              # the Mixtral-8x7B shape: 46.7B / 12.9B active
    moeify inspect Qwen/Qwen1.5-MoE-A2.7B                       # 60 experts top-4 + shared: 14.3B / 2.7B
    moeify inspect ./my-llama --granularity 4 --shared-experts 1 --moe-layers skip-first:1 --json
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from moeify import ui
from moeify.card import human
from moeify.commands.options import (
    DTypeOpt, ExpertsOpt, FormatOpt, GranularityOpt, LayersOpt, SharedOpt, SourceArg, TopkOpt, optional,
)
from moeify.spec import Spec

if TYPE_CHECKING:
    from moeify.anatomy import Anatomy, Block, Plan

JsonOpt = Annotated[bool, typer.Option("--json", metavar="", help="Print a JSON report for scripts.")]


def inspect(
    source_: SourceArg,
    experts: optional(ExpertsOpt) = None,
    topk: optional(TopkOpt) = None,
    granularity: optional(GranularityOpt) = None,
    shared_experts: optional(SharedOpt) = None,
    moe_layers: optional(LayersOpt) = None,
    format_: optional(FormatOpt) = None,
    dtype: optional(DTypeOpt) = None,
    json_: JsonOpt = False,
) -> None:
    """Architecture, layers, experts, total and active parameters and sizes, without downloading weights.

    With conversion options on a dense source: the upcycled result, and the memory and disk the
    conversion needs.

    Examples:

    moeify inspect mistral-7b --experts 8 --topk 2

    moeify inspect Qwen/Qwen1.5-MoE-A2.7B --json

    moeify inspect ./my-llama --granularity 4 --shared-experts 1 --moe-layers skip-first:1
    """
    from moeify import anatomy, hub  # paid when a config is read, not for --help

    config, folder = hub.source_config(source_, notify=ui.say)
    model = anatomy.describe(config)
    given = dict(experts=experts, topk=topk, granularity=granularity, shared_experts=shared_experts,
                 moe_layers=moe_layers, format=format_, dtype=dtype)
    options = {k: v for k, v in given.items() if v is not None}
    plan = anatomy.upcycled(config, Spec(**options)) if options else None
    report = _report(source_, model, folder, plan)
    if json_:
        typer.echo(json.dumps(report, indent=2))
        return
    ui.show(_table(f"{source_}", model, report))
    if plan is not None:
        ui.show(_table(f"after upcycling ({_options_line(options)})", plan.result, report["conversion"]))


def _report(source: str, model: Anatomy, folder: Path | None, plan: Plan | None) -> dict[str, Any]:
    report = _anatomy(model) | {"source": source}
    weights = sorted(folder.glob("*.safetensors")) if folder else []
    report["safetensors_bytes"] = sum(p.stat().st_size for p in weights) if weights else None
    if plan is not None:
        report["conversion"] = _anatomy(plan.result) | {
            "target": plan.target, "reason": plan.reason, "dtype": plan.dtype,
            "peak_memory_bytes": plan.peak_memory, "disk_bytes": plan.disk,
        }
    return report


def _anatomy(model: Anatomy) -> dict[str, Any]:
    return {
        "architecture": model.architecture,
        "kind": model.kind.value,
        "num_layers": len(model.blocks),
        "hidden_size": model.hidden,
        "ffn_share": round(model.ffn_share, 4),
        "layers": [_group(indices, block) for indices, block in model.groups()],
        "total_params": model.total,
        "active_params": model.active,
        "size_bytes": model.sizes(),
    }


def _group(indices: list[int], block: Block) -> dict[str, Any]:
    group: dict[str, Any] = {"layers": indices, "moe": block.moe}
    if block.peer:
        group |= {"peer": True, "neurons": block.neurons, "grid_side": math.isqrt(block.experts),
                  "heads": block.heads, "active_neurons": block.topk, "shared_neurons": block.shared_experts,
                  "neuron_share": round(block.neuron_share, 4)}
    elif block.moe:
        group |= {"experts": block.experts, "topk": block.topk, "shared_experts": block.shared_experts,
                  "expert_intermediate_size": block.expert_width, "shared_intermediate_size": block.shared_width}
    return group | {"params_per_layer": block.total, "active_per_layer": block.active}


def _table(title: str, model: Anatomy, report: dict[str, Any]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    name = f"moeify remote over {model.architecture}" if model.kind.value == "remote" else model.architecture
    if report.get("target"):
        table.add_row("format", f"{name} — {report['reason']}")
    else:
        table.add_row("architecture", f"{name} ({model.kind.value})" if model.kind.value != "remote" else name)
    table.add_row("layers", f"{len(model.blocks)}, hidden size {model.hidden}")
    table.add_row("FFN share", f"{model.ffn_share:.1%} of parameters")
    for group in report["layers"]:
        table.add_row(_span(group["layers"]), _describe(group))
    table.add_row("parameters", f"{human(model.total)} total, {human(model.active)} active per token")
    sizes = ", ".join(f"{human(size, 'B')} {dtype}" for dtype, size in model.sizes().items())
    table.add_row("size", sizes)
    if report.get("safetensors_bytes"):
        table.add_row("on disk", f"{human(report['safetensors_bytes'], 'B')} of safetensors here")
    if "peak_memory_bytes" in report:
        table.add_row("conversion needs", f"~{human(report['peak_memory_bytes'], 'B')} RAM (streams one layer "
                      f"at a time), {human(report['disk_bytes'], 'B')} free disk ({report['dtype']})")
    return table


def _span(indices: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> 'layers 0-2, 5, 7-8'."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and runs[-1][-1] == i - 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    text = ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)
    return f"layer{'s' if len(indices) > 1 else ''} {text}"


def _describe(group: dict[str, Any]) -> str:
    if not group["moe"]:
        return "dense FFN"
    if group.get("peer"):
        shared = f" + {group['shared_neurons']} shared" if group["shared_neurons"] else ""
        side = group["grid_side"]
        return (f"PEER: {group['neurons']} neurons on a {side}×{side} grid, {group['heads']} head(s) "
                f"retrieve {group['active_neurons']}{shared} per token ({group['neuron_share']:.1%} of neurons)")
    shared = (f", {group['shared_experts']} shared of width {group['shared_intermediate_size']}"
              if group["shared_experts"] else "")
    return (f"{group['experts']} experts of width {group['expert_intermediate_size']}, "
            f"top-{group['topk']}{shared}")


def _options_line(options: dict[str, Any]) -> str:
    return " ".join(f"--{name.replace('_', '-')} {getattr(value, 'value', value)}"  # enums by their value
                    for name, value in options.items())
