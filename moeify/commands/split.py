"""`moeify split`: cut each FFN (or each expert of a MoE) into finer experts.

Examples:

    moeify split smollm2-135m --granularity 8 --output smollm2-split8          # all 8 active: exact
    moeify split smollm2-135m --granularity 8 --topk 4 --calibration notes.txt --output smollm2-8e-top4
    moeify split smollm2-135m --granularity 8 --topk 4 --refit --output smollm2-8e-top4-refit  # least squares
    moeify split ./my-llama --granularity 16 --shared-experts 2 --topk 6 --partition activation --output out
    moeify split ./my-mixtral --granularity 2 --output mixtral-16e                # native Mixtral, exact
    moeify split ./my-qwen3-moe --granularity 2 --output qwen3-moe-fine          # native Qwen3-MoE, exact
    moeify split ./my-moeify-model --granularity 4 --output finer                 # a moeify checkpoint, exact
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from moeify import source, ui
from moeify.adapters import adapter_for
from moeify.output import claim
from moeify.commands.options import (
    DTypeOpt, EngineOpt, FormatOpt, LayersOpt, OutputOpt, OverwriteOpt, SeedOpt, ShardOpt, SharedOpt, SourceArg,
)
from moeify.errors import MoeifyError
from moeify.spec import DType, Engine, Format, Mode, Partition, Spec, SplitRouter

if TYPE_CHECKING:  # torch and transformers load when a split runs, not for `moeify split --help`
    from moeify.moe_source import MoESource
    from moeify.split import LayerPlan

GranularityOpt = Annotated[int, typer.Option(help="Pieces per FFN (or per expert of a MoE source).")]
TopkOpt = Annotated[int | None, typer.Option(
    help="Routed pieces per token. Default: all of them for a dense source (exact), top-k·G for a MoE source.")]
PartitionOpt = Annotated[Partition, typer.Option(help="How neurons are grouped into experts.")]
RouterOpt = Annotated[SplitRouter, typer.Option("--router-init", help="How routers are built for the pieces.")]
CalibrationOpt = Annotated[str | None, typer.Option("--calibration",
    help="Calibration text: a .txt or .jsonl ({\"text\": ...}) file, a .parquet/.arrow file or dataset folder "
         "with a text column, or a Hub dataset name. "
         "Default: moeify's built-in mix of English prose, dialogue and Python code.")]
TokensOpt = Annotated[int, typer.Option("--calibration-tokens", help="Calibration tokens; what the text lacks comes from the built-in mix.")]
RefitOpt = Annotated[bool, typer.Option("--refit/--no-refit",
    help="Refit each FFN's down projection by least squares so that the pieces a token selects reproduce the "
         "whole FFN on the calibration text (dense source, fewer pieces than all selected).")]


def split(
    source_: SourceArg,
    output: OutputOpt,
    granularity: GranularityOpt = 8,
    topk: TopkOpt = None,
    shared_experts: SharedOpt = 0,
    partition: PartitionOpt = Partition.ACTIVATION,
    router_init: RouterOpt = SplitRouter.FIT,
    calibration_: CalibrationOpt = None,
    calibration_tokens: TokensOpt = 6144,
    refit: RefitOpt = False,
    moe_layers: LayersOpt = "all",
    format_: FormatOpt = Format.AUTO,
    engine: EngineOpt = Engine.ANY,
    dtype: DTypeOpt = DType.AUTO,
    seed: SeedOpt = 0,
    max_shard_size: ShardOpt = "5GB",
    overwrite: OverwriteOpt = False,
) -> None:
    """Cut FFNs into G experts of disjoint neurons (dense source), or every expert into G pieces (MoE source).

    A dense split uses unit combine weights (remote format): with all pieces selected it is the
    dense model exactly; with fewer it keeps the chosen pieces' partial sum. A MoE split repeats
    router rows and multiplies top-k by G, which is exact in the source's own native format.

    Examples:

    moeify split smollm2-135m --granularity 8 --output smollm2-split8   # all 8 active: exact, no compute saved

    moeify split smollm2-135m --granularity 8 --topk 4 --calibration notes.txt --output smollm2-8e-top4

    moeify split smollm2-135m --granularity 8 --topk 4 --refit --output smollm2-8e-top4-refit

    moeify split ./my-mixtral --granularity 2 --output mixtral-16e   # native Mixtral, exact
    """
    from moeify import calibration, conversion
    from moeify.checkpoint import Checkpoint
    from moeify.moe_source import moe_source_for

    with claim(output, overwrite, protect=[source_], notify=ui.say) as out:  # before any download, held to the end
        if calibration_ is not None:
            calibration.check_text(calibration_, calibration_tokens)  # a missing or empty file fails before anything is loaded
        folder = source.resolve(source_, notify=ui.say)
        out.protect(folder)  # a Hub id or .gguf is a folder in a cache only now
        config = Checkpoint(folder).config
        moe = moe_source_for(config)
        if moe:
            moe_layers = _moe_layers(moe, config, moe_layers, granularity)
        if topk is None:  # the exact choice: every routed piece (dense), or the source's top-k times G (MoE)
            topk = moe.topk(config) * granularity if moe else max(granularity - shared_experts, 1)
        spec = Spec(mode=Mode.SPLIT, experts=moe.count if moe else 1, granularity=granularity, topk=topk,
                    shared_experts=shared_experts, partition=partition, split_router=router_init,
                    calibration=calibration_, calibration_tokens=calibration_tokens, refit=refit, moe_layers=moe_layers,
                    format=format_, engine=engine, dtype=dtype, seed=seed, max_shard_size=max_shard_size)
        transform = _moe_transform(moe, spec) if moe else _dense_transform(folder, config, spec)
        with ui.byte_progress("writing") as (set_total, advance):
            result = conversion.convert(folder, out, spec, source=source_, transform=transform, adapter=moe,
                                        overwrite=overwrite, on_plan=set_total, on_bytes=advance)
    ui.conclude(result)


def _moe_transform(moe: MoESource, spec: Spec):
    from moeify.split import split_moe

    if spec.shared_experts:
        raise MoeifyError("--shared-experts carves neurons of dense FFNs; a MoE source keeps its own experts")
    if spec.refit:
        raise MoeifyError("--refit refits the pieces of dense FFNs; a MoE source's split is exact already")
    if moe.native and spec.format is Format.REMOTE:
        raise MoeifyError(f"a {moe.model_type} source is split into its own native format; drop --format remote")
    if not moe.native and spec.format is Format.NATIVE:
        raise MoeifyError("a moeify checkpoint is split into the remote format; drop --format native")
    return split_moe


def _moe_layers(moe: MoESource, config: dict, requested: str, granularity: int) -> str:
    """--moe-layers for a MoE source: every MoE layer of the source (the others are dense and pass through)."""
    from moeify.moe_source import field_of
    from moeify.transforms import check_divisible

    if requested != "all":
        raise MoeifyError("a MoE source is split in every one of its MoE layers; drop --moe-layers")
    width = field_of(config, moe.width_field)
    if width is not None:  # refused before anything is read or written
        check_divisible(int(width), granularity)
    layers = moe.moe_layers(config)
    if not layers:
        raise MoeifyError(f"this {moe.model_type} checkpoint has no MoE layer to split")
    return "all" if len(layers) == moe.num_layers(config) else ",".join(map(str, layers))


def _dense_transform(folder: Path, config: dict, spec: Spec):
    """split_ffn bound to calibration statistics of every MoE layer (collected now when needed)."""
    from moeify.checkpoint import Checkpoint
    from moeify.split import needs_calibration, split_ffn
    from moeify.transforms import check_divisible

    adapter = adapter_for(config)
    layers = spec.layers(adapter.num_layers(config))
    check_divisible(adapter.read_ffn(Checkpoint(folder), layers[0], meta=True).intermediate_size, spec.granularity)
    if not needs_calibration(spec):
        return split_ffn
    plans = _calibrate(folder, adapter, layers, spec)
    return lambda ffn, spec_, layer: split_ffn(ffn, spec_, layer, plans[layer])


def _calibrate(folder: Path, adapter, layers: list[int], spec: Spec) -> dict[int, LayerPlan]:
    """Each layer's grouping and router, from statistics on calibration text (dropped once used)."""
    from moeify import calibration
    from moeify.checkpoint import Checkpoint
    from moeify.split import plan_layer

    ckpt = Checkpoint(folder)
    act = adapter.activation_fn(ckpt.config)
    # The source's dtype: planning widens only the rows it uses (a float32 FFN of a 1.1B is 138 MB).
    reduce = lambda layer, stats: plan_layer(adapter.read_ffn(ckpt, layer), spec, layer, stats, act)
    with ui.count_progress("calibrating (layers)") as report:
        return calibration.collect(folder, adapter, layers, spec.calibration, spec.calibration_tokens, spec.seed,
                                   coactivation=spec.partition is Partition.ACTIVATION, keep_inputs=spec.refit,
                                   on_progress=report, notify=ui.say, reduce=reduce)
