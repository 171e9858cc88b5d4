"""`moeify upcycle`: copy each FFN into experts behind a new router (sparse upcycling).

Examples:

    moeify upcycle smollm2-135m --experts 8 --topk 2 --output smollm2-8x135m
    moeify upcycle mistral-7b --experts 8 --topk 2 --dtype bfloat16 --output mixtral-upcycled
    moeify upcycle ./my-llama --experts 4 --topk 1 --noise 0.01 --output ./my-llama-4e
    moeify upcycle model.gguf --experts 8 --topk 2 --drop-ratio 0.5 --seed 1 --output out
"""

from __future__ import annotations

from pathlib import Path

from moeify import source, ui
from moeify.commands.options import (
    DropOpt, DTypeOpt, EngineOpt, ExpertsOpt, FormatOpt, GranularityOpt, LayersOpt, NoiseOpt, OutputOpt, OverwriteOpt,
    RouterInitOpt, RouterStdOpt, SeedOpt, ShardOpt, SharedOpt, SourceArg, TopkOpt,
)
from moeify.output import claim
from moeify.spec import DType, Engine, Format, RouterInit, Spec


def upcycle(
    source_: SourceArg,
    output: OutputOpt,
    experts: ExpertsOpt = 8,
    topk: TopkOpt = 2,
    granularity: GranularityOpt = 1,
    shared_experts: SharedOpt = 0,
    moe_layers: LayersOpt = "all",
    format_: FormatOpt = Format.AUTO,
    engine: EngineOpt = Engine.ANY,
    dtype: DTypeOpt = DType.AUTO,
    router_init: RouterInitOpt = RouterInit.RANDOM,
    router_std: RouterStdOpt = 0.02,
    noise: NoiseOpt = 0.0,
    drop_ratio: DropOpt = 0.0,
    seed: SeedOpt = 0,
    max_shard_size: ShardOpt = "5GB",
    overwrite: OverwriteOpt = False,
) -> None:
    """Turn a dense model into a MoE whose experts are copies of its FFNs.

    With --noise 0 and --drop-ratio 0 (the default) the result computes exactly what the source did.

    Examples:

    moeify upcycle smollm2-135m --experts 8 --topk 2 --output smollm2-8x135m

    moeify upcycle mistral-7b --experts 8 --topk 2 --dtype bfloat16 --output mixtral-upcycled

    moeify upcycle ./my-llama --experts 4 --topk 1 --drop-ratio 0.5 --seed 1 --output my-llama-4e
    """
    spec = Spec(experts=experts, topk=topk, granularity=granularity, shared_experts=shared_experts,
                moe_layers=moe_layers, format=format_, engine=engine, dtype=dtype, router_init=router_init,
                router_std=router_std, noise=noise, drop_ratio=drop_ratio, seed=seed,
                max_shard_size=max_shard_size)
    run(source_, output, spec, overwrite)


def run(source_name: str, output: Path, spec: Spec, overwrite: bool, transform=None) -> None:
    """Resolve, convert with a progress bar, and print the summary: shared by every converting command.

    transform: one layer's FFN to its MoE layer; default: copies (upcycling).
    """
    from moeify import conversion  # torch and transformers: loaded when a conversion runs, not for --help
    from moeify.transforms import upcycle

    with claim(output, overwrite, protect=[source_name], notify=ui.say) as out:  # before any download, held to the end
        folder = source.resolve(source_name, notify=ui.say)
        out.protect(folder)  # a Hub id or .gguf is a folder in a cache only now
        with ui.byte_progress("writing") as (set_total, advance):
            result = conversion.convert(folder, out, spec, source=source_name, transform=transform or upcycle,
                                        overwrite=overwrite, on_plan=set_total, on_bytes=advance)
    ui.conclude(result)
