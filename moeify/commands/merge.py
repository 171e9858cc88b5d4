"""`moeify merge`: one MoE from several fine-tunes of one base, each expert the FFN of its own source.

Examples:

    moeify merge ./base --expert ./code-ft:code.yaml --expert ./math-ft:math.txt --output code-math-moe
    moeify merge ./base --expert ./base --expert ./chat-ft --expert ./code-ft --gate random --topk 2 --output out
    moeify merge ./base --expert ./a --expert ./b --shared ./base --prompts prompts.yaml --output qwen-like
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from moeify import source, ui
from moeify.commands.options import (
    DTypeOpt,
    EngineOpt,
    FormatOpt,
    GranularityOpt,
    LayersOpt,
    NoiseOpt,
    OutputOpt,
    OverwriteOpt,
    RouterStdOpt,
    SeedOpt,
    ShardOpt,
    TopkOpt,
)
from moeify.errors import MoeifyError
from moeify.output import claim
from moeify.spec import DType, Engine, Format, Gate, Spec

BaseArg = Annotated[str, typer.Argument(metavar="BASE", help="The model attention, norms and embeddings come from "
                                        "(folder, .gguf, Hub id or alias).")]
ExpertOpt = Annotated[list[str], typer.Option(
    "--expert", metavar="SOURCE[:PROMPTS]",
    help="A routed expert: the model its FFNs come from, and optionally its prompts (a YAML file with "
         "positive:/negative: lists, a text file of one prompt a line, or the text of one prompt). Repeat it.")]
SharedSourceOpt = Annotated[list[str] | None, typer.Option(
    "--shared", metavar="SOURCE", help="A shared (always-on) expert's source model. Repeat for more.")]
PromptsOpt = Annotated[Path | None, typer.Option(
    "--prompts", help="YAML mapping each expert's SOURCE (or index) to its positive:/negative: prompts.")]
GateOpt = Annotated[Gate | None, typer.Option(
    "--gate", help="How routers start; default: hidden when every expert has prompts, random otherwise.")]


def merge(
    base: BaseArg,
    output: OutputOpt,
    expert: ExpertOpt,
    shared: SharedSourceOpt = None,
    prompts: PromptsOpt = None,
    gate: GateOpt = None,
    topk: TopkOpt = 2,
    granularity: GranularityOpt = 1,
    moe_layers: LayersOpt = "all",
    format_: FormatOpt = Format.AUTO,
    engine: EngineOpt = Engine.ANY,
    dtype: DTypeOpt = DType.AUTO,
    noise: NoiseOpt = 0.0,
    router_std: RouterStdOpt = 0.02,
    seed: SeedOpt = 0,
    max_shard_size: ShardOpt = "5GB",
    overwrite: OverwriteOpt = False,
) -> None:
    """Merge fine-tunes of BASE into one MoE: BASE's attention, norms and embeddings, each expert's FFN from its source.

    Sources must be BASE's family with its shapes and vocabulary. With --gate hidden each expert's
    router row comes from BASE's hidden states on its prompts, one layer at a time.

    Examples:

    moeify merge ./base --expert ./code-ft:code.yaml --expert ./math-ft:math.txt --output code-math-moe

    moeify merge ./base --expert ./a --expert ./b --shared ./base --prompts prompts.yaml --output out
    """
    from moeify.merge import ExpertSource, apply_prompt_file, merge_spec, parse_expert  # torch: when it runs

    experts = [parse_expert(text) for text in expert]
    if prompts is not None:
        experts = apply_prompt_file(experts, prompts)
    if gate is None:
        gate = Gate.HIDDEN if experts and all(e.positive for e in experts) else Gate.RANDOM
    spec = merge_spec(experts, [ExpertSource(s) for s in shared or []], gate=gate, topk=topk,
                      granularity=granularity, moe_layers=moe_layers, format=format_, engine=engine, dtype=dtype,
                      noise=noise, router_std=router_std, seed=seed, max_shard_size=max_shard_size)
    run(base, output, spec, overwrite)


def run(base: str, output: Path, spec: Spec, overwrite: bool) -> None:
    """Resolve BASE and every source, learn the gates, convert, and print the summary and routing report."""
    from moeify import conversion
    from moeify.merge import prepare, sources_of

    experts, shared = sources_of(spec)
    if not experts:
        raise MoeifyError("a merge needs --expert SOURCE for each routed expert")
    names = list(dict.fromkeys([base, *(e.source for e in experts + shared)]))
    with claim(output, overwrite, protect=names, notify=ui.say) as out:  # before any download, held to the end
        folders = {name: source.resolve(name, notify=ui.say) for name in names}
        out.protect(*folders.values())  # Hub ids and .gguf files are folders in a cache only now
        merge_ = prepare(folders[base], spec, folders)
        with ui.byte_progress("writing", counted="routers from prompts (layers)") as (set_total, advance, report), \
                merge_.running(report):
            result = conversion.convert(folders[base], out, spec, source=base, transform=merge_.transform,
                                        adapter=merge_.reader, notes=merge_.notes,
                                        routers=merge_.routers, overwrite=overwrite,
                                        on_plan=set_total, on_bytes=advance)
            lines = merge_.lines()
    ui.conclude(result)
    for line in lines:  # the routing report
        ui.result(line)
