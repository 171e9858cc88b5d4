"""`moeify peer`: each FFN into a PEER layer, its neurons single experts found by product keys.

Examples:

    moeify peer smollm2-135m --output smollm2-peer                                  # --topk all: exact
    moeify peer smollm2-135m --topk 768 --calibration notes.txt --output smollm2-peer-half
    moeify peer smollm2-135m --heads 4 --topk 128 --shared-neurons 192 --output smollm2-peer-4h
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from moeify import source, ui
from moeify.adapters import Adapter, adapter_for
from moeify.commands.options import DTypeOpt, LayersOpt, OutputOpt, OverwriteOpt, SeedOpt, ShardOpt, SourceArg
from moeify.commands.split import CalibrationOpt, TokensOpt
from moeify.errors import MoeifyError
from moeify.output import claim
from moeify.spec import DType, Retrieval, Scoring, parse_layers

if TYPE_CHECKING:
    from moeify.peer import PeerPlan, PeerSpec

HeadsOpt = Annotated[int, typer.Option(help="Retrieval heads; a token uses the union of their top-k neurons.")]
TopkOpt = Annotated[str, typer.Option(help="Neurons each head retrieves per token, or all (exact: the dense FFN).")]
SharedNeuronsOpt = Annotated[int, typer.Option("--shared-neurons", help="Always-on neurons per layer (the most often active).")]
KeyDimOpt = Annotated[int | None, typer.Option("--key-dim", help="Query size per head (even). Default: twice the grid side, capped at twice the hidden size.")]
QueryNormOpt = Annotated[bool, typer.Option("--query-norm", help="BatchNorm on the queries, as in the PEER paper (identity at conversion).")]
RetrievalOpt = Annotated[Retrieval, typer.Option(help="What retrieval approximates: up (each neuron's up row, scaled; by magnitude when gated) or fit (least squares onto its share of the contribution); rows: up's scores exactly, from heads that each own one grid row (two, one per sign, when gated), --topk then being neurons per token shared evenly by the rows. Rows routing is not O(sqrt N): its queries are 4x the size and compute of the up projection (2x when not gated; half of them zero rows).")]
ScoringOpt = Annotated[Scoring, typer.Option(help="unit: chosen neurons weigh 1 (a partial sum of the FFN); softmax: PEER's softmax over each head's scores.")]


def peer(
    source_: SourceArg,
    output: OutputOpt,
    heads: HeadsOpt = 1,
    topk: TopkOpt = "all",
    shared_neurons: SharedNeuronsOpt = 0,
    key_dim: KeyDimOpt = None,
    query_norm: QueryNormOpt = False,
    scoring: ScoringOpt = Scoring.UNIT,
    retrieval: RetrievalOpt = Retrieval.UP,
    calibration_: CalibrationOpt = None,
    calibration_tokens: TokensOpt = 6144,
    moe_layers: LayersOpt = "all",
    dtype: DTypeOpt = DType.AUTO,
    seed: SeedOpt = 0,
    max_shard_size: ShardOpt = "5GB",
    overwrite: OverwriteOpt = False,
) -> None:
    """Turn each FFN into a PEER layer: every neuron an expert, found per token by product-key retrieval.

    With --topk all (the default) every neuron is retrieved with weight 1: the dense model exactly.
    With fewer, retrieval is fitted on calibration text without training, to find the neurons a
    token really uses; measure the result with `moeify verify`.

    Examples:

    moeify peer smollm2-135m --output smollm2-peer   # --topk all: the dense model exactly

    moeify peer smollm2-135m --topk 768 --calibration notes.txt --output smollm2-peer-half

    moeify peer smollm2-135m --heads 4 --topk 128 --shared-neurons 192 --output smollm2-peer-4h
    """
    from moeify import calibration, conversion  # torch and transformers: when a conversion runs, not for --help
    from moeify.checkpoint import Checkpoint
    from moeify.peer import PeerSpec

    with claim(output, overwrite, protect=[source_], notify=ui.say) as out:  # before any download, held to the end
        if calibration_ is not None:
            calibration.check_text(calibration_, calibration_tokens)  # a missing or empty file fails before anything is loaded
        folder = source.resolve(source_, notify=ui.say)
        out.protect(folder)
        config = Checkpoint(folder).config
        adapter = adapter_for(config)
        layers = parse_layers(moe_layers, adapter.num_layers(config))
        neurons = adapter.read_ffn(Checkpoint(folder), layers[0], meta=True).intermediate_size
        spec = PeerSpec(granularity=neurons, topk=_topk(topk, neurons - shared_neurons), heads=heads,
                        shared_experts=shared_neurons, key_dim=key_dim, query_norm=query_norm, scoring=scoring,
                        retrieval=retrieval,
                        calibration=calibration_, calibration_tokens=calibration_tokens, moe_layers=moe_layers,
                        dtype=dtype, seed=seed, max_shard_size=max_shard_size)
        transform = _transform(folder, adapter, layers, spec)
        with ui.byte_progress("writing") as (set_total, advance):
            result = conversion.convert(folder, out, spec, source=source_, transform=transform,
                                        overwrite=overwrite, on_plan=set_total, on_bytes=advance)
    ui.conclude(result)


def _topk(text: str, routed: int) -> int:
    """--topk as a number: `all` is every routed neuron; anything else must be a whole number."""
    if text.strip().lower() == "all":
        return max(routed, 1)
    try:
        return int(text)
    except ValueError:
        raise MoeifyError(f"--topk must be a whole number or all (got {text!r})") from None


def _transform(folder: Path, adapter: Adapter, layers: list[int], spec: PeerSpec):
    """peer_ffn bound to each layer's calibrated plan (collected now, when retrieval has anything to learn)."""
    from moeify.peer import peer_ffn

    if not spec.needs_calibration():
        return peer_ffn
    plans = _calibrate(folder, adapter, layers, spec)
    return lambda ffn, spec_, layer: peer_ffn(ffn, spec_, layer, plans[layer])


def _calibrate(folder: Path, adapter: Adapter, layers: list[int], spec: PeerSpec) -> dict[int, PeerPlan]:
    """Each layer's shared neurons, placement and retrieval, from statistics on calibration text."""
    from moeify import calibration
    from moeify.checkpoint import Checkpoint
    from moeify.peer import plan_layer

    ckpt = Checkpoint(folder)
    reduce = lambda layer, stats: plan_layer(adapter.read_ffn(ckpt, layer).map(lambda role, t: t.float()),  # noqa: E731
                                             spec, layer, stats)
    with ui.count_progress("calibrating (layers)") as report:
        return calibration.collect(folder, adapter, layers, spec.calibration, spec.calibration_tokens, spec.seed,
                                   coactivation=False, on_progress=report, notify=ui.say, reduce=reduce)
