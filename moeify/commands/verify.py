"""`moeify verify`: what a conversion cost, measured against its source on the same text.

Examples:

    moeify verify smollm2-135m ./smollm2-8x135m
    moeify verify ./my-llama ./my-llama-4e --text held-out.txt --tokens 2048
    moeify verify ./my-llama ./my-llama-split --max-ppl-ratio 1.05 --plot load.png
    moeify verify ./mixtral-upcycled ./mixtral-split --json > report.json
    moeify verify ./my-llama ./someone-elses-moe --trust-remote-code   # runs that folder's own Python
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from moeify import ui
from moeify.card import human
from moeify.commands.options import SourceArg

if TYPE_CHECKING:  # torch and transformers load when verify runs, not for `moeify verify --help`
    from moeify import verify as checks

ConvertedArg = Annotated[str, typer.Argument(metavar="CONVERTED", help="The converted model: any form SOURCE takes.")]
TextOpt = Annotated[Path | None, typer.Option("--text", help="Plain-text file to read (default: built-in English).")]
TokensOpt = Annotated[int, typer.Option("--tokens", help="Tokens of the text to read, chunked to the context.")]
MaxRatioOpt = Annotated[float | None, typer.Option("--max-ppl-ratio",
                                                   help="Exit 1 when converted/source perplexity exceeds this.")]
PlotOpt = Annotated[Path | None, typer.Option("--plot", help="Write a PNG heatmap of expert load (layers x experts).")]
JsonOpt = Annotated[bool, typer.Option("--json", metavar="", help="Print the report as JSON on stdout instead of tables.")]
TrustOpt = Annotated[bool, typer.Option(
    "--trust-remote-code", metavar="",
    help="Run Python a model folder ships (config.json auto_map). Off: such folders are refused, "
         "except moeify's own outputs, whose code moeify checks and runs from its own package.")]

WIDE = 8  # beyond this many experts the load table summarises each layer: a row of experts fits 80 columns


def verify(
    source_: SourceArg,
    converted: ConvertedArg,
    text: TextOpt = None,
    tokens: TokensOpt = 512,  # moeify.verify.DEFAULT_TOKENS, written out so that --help needs no torch
    max_ppl_ratio: MaxRatioOpt = None,
    plot: PlotOpt = None,
    json_: JsonOpt = False,
    trust_remote_code: TrustOpt = False,
) -> None:
    """Compare a converted model with its source: logits, perplexity, agreement, parameters, expert load.

    Both models read the same tokens; an exact conversion shows a perplexity ratio of 1.
    A folder that ships its own Python is refused unless --trust-remote-code is given.

    Examples:

    moeify verify smollm2-135m ./smollm2-8x135m

    moeify verify ./my-llama ./my-llama-split --text held-out.txt --tokens 2048 --max-ppl-ratio 1.05

    moeify verify ./my-llama ./my-llama-4e --plot load.png --json > report.json
    """
    from moeify import verify as checks
    from moeify.plotting import plot_file

    plot = plot_file(plot) if plot is not None else None  # before the models run, not after
    report = checks.verify(source_, converted, checks.load_text(text, tokens), tokens, notify=ui.say,
                           trust_remote_code=trust_remote_code)
    if plot is not None:
        ui.say(f"expert load heatmap written to {checks.plot(report, plot)}")
    if json_:
        verdict = {} if max_ppl_ratio is None else {"max_ppl_ratio": max_ppl_ratio,  # no limit: nothing passed
                                                     "passed": report.ppl_ratio <= max_ppl_ratio}
        typer.echo(json.dumps(report.to_dict() | verdict, indent=2))
    else:
        ui.show(summary(report))
        for stats in (report.source, report.converted):
            if stats.load:
                ui.show(load_table(stats))
    if max_ppl_ratio is not None and report.ppl_ratio > max_ppl_ratio:
        ui.say(f"perplexity ratio {report.ppl_ratio:.4f} exceeds the limit {max_ppl_ratio:g}")
        raise typer.Exit(1)


def summary(report: checks.Report) -> Table:
    table = Table("", "source", "converted", title=f"verify on {report.tokens} tokens ({report.chunks} chunk(s))",
                  title_justify="left")
    a, b = report.source, report.converted
    table.add_row("model", a.name, b.name)
    table.add_row("experts", _routing(a), _routing(b))
    table.add_row("parameters", human(a.total_params), human(b.total_params))
    table.add_row("active per token", human(a.active_params), human(b.active_params))
    if a.retrieval or b.retrieval:  # PEER layers: what retrieval finds, against the oracle's choice
        table.add_row("PEER neurons per token", *(_neurons(s.retrieval) for s in (a, b)))
        table.add_row("PEER retrieval recall", *(f"{s.retrieval['recall']:.1%}" if s.retrieval else "" for s in (a, b)))
    table.add_row("perplexity", f"{a.perplexity:.4f}", f"{b.perplexity:.4f}")
    table.add_row("perplexity ratio", "", f"{report.ppl_ratio:.4f}")
    table.add_row("top-1 agreement", "", f"{report.top1_agreement:.2%}")
    table.add_row("max |Δ logit|", "", f"{report.max_logit_diff:.3g}")
    table.add_row("mean |Δ logit|", "", f"{report.mean_logit_diff:.3g}")
    return table


def _routing(stats: checks.ModelStats) -> str:
    r = stats.routing
    if r is None:
        return "PEER" if stats.retrieval else "dense"
    return f"{r.experts} routed, top-{r.topk}" + (f", {r.shared} shared" if r.shared else "")


def _neurons(retrieval: dict | None) -> str:
    return f"{retrieval['neurons_per_token']:.1f} ({retrieval['neuron_share']:.1%})" if retrieval else ""


def load_table(stats: checks.ModelStats) -> Table:
    """Share of top-k selections per expert, one row per MoE layer; beyond WIDE experts, a summary per layer.

    peak: the busiest expert's share over the uniform share (1: perfectly balanced). Fits 80 columns.
    """
    experts = stats.routing.experts
    title = f"expert load of {stats.name} (share of selections; uniform = {1 / experts:.1%}; peak = busiest/uniform)"
    if experts <= WIDE:
        table = Table("layer", *[str(j) for j in range(experts)], "peak", title=title, title_justify="left",
                      show_edge=False)  # 8 experts of up to 100.0% each still fit 80 columns
        for layer, share in stats.load.items():
            table.add_row(str(layer), *[f"{s:.1%}" for s in share], f"{max(share) * experts:.2f}")
        return table
    table = Table("layer", "min", "median", "max", "busiest", "idlest", "idle", "peak",
                  title=title + "; --json or --plot for each expert", title_justify="left")
    for layer, share in stats.load.items():
        order = sorted(range(experts), key=lambda j: (-share[j], j))
        table.add_row(str(layer), f"{min(share):.1%}", f"{statistics.median(share):.1%}", f"{max(share):.1%}",
                      _experts(order[:2]), _experts(order[:-3:-1]), str(sum(s == 0 for s in share)),
                      f"{max(share) * experts:.2f}")
    return table


def _experts(ids: list[int]) -> str:
    """Two expert ids, the most (or least) used first: "12,3"."""
    return ",".join(map(str, ids))
