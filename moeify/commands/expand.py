"""`moeify expand`: grow every MoE layer by N routed experts, keeping top-k, groups and format.

Examples:

    moeify expand ./my-moe --add 2 --output my-moe-plus2                    # copies of each layer's busiest expert
    moeify expand ./my-moe --add 4 --from copy:0 --freeze old --output grown
    moeify expand ./my-mixtral --add 1 --from ./new-domain-llama --output mixtral-9x
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from moeify import source, ui
from moeify.commands.options import DTypeOpt, NoiseOpt, OutputOpt, OverwriteOpt, SeedOpt, ShardOpt
from moeify.errors import MoeifyError
from moeify.output import claim
from moeify.spec import DType

MoeArg = Annotated[str, typer.Argument(metavar="MOE", help="A moeify, Mixtral, Qwen2-MoE or Qwen3-MoE checkpoint "
                                       "(folder, Hub id).")]
AddOpt = Annotated[int, typer.Option("--add", help="Routed experts added to every MoE layer (groups of pieces when "
                                     "the MoE was made with --granularity).")]
FromOpt = Annotated[str, typer.Option("--from", help="Where new experts come from: copy:busiest (each layer's most "
                                      "used on the built-in text), copy:J, or a dense model of the MoE's base.")]
FreezeOpt = Annotated[str | None, typer.Option("--freeze", metavar="old",
                                               help="old: record the old experts as frozen in config.json.")]


def expand(
    moe: MoeArg,
    output: OutputOpt,
    add: AddOpt,
    from_: FromOpt = "copy:busiest",  # moeify.expand.BUSIEST, written out: `expand --help` imports no torch
    freeze: FreezeOpt = None,
    noise: NoiseOpt = 0.0,
    dtype: DTypeOpt = DType.AUTO,
    seed: SeedOpt = 0,
    max_shard_size: ShardOpt = "5GB",
    overwrite: OverwriteOpt = False,
) -> None:
    """Add N routed experts to every MoE layer; at step 0 the model computes what it did where the format allows.

    The remote format is exact (new experts held off by a selection bias); for Mixtral and Qwen-MoE the
    summary says how far the output's logits are from the source's, measured.

    Examples:

    moeify expand ./my-moe --add 2 --output my-moe-plus2

    moeify expand ./my-moe --add 4 --from copy:0 --freeze old --output grown
    """
    if freeze not in (None, "old"):
        raise MoeifyError(f"--freeze {freeze!r}: the only choice is --freeze old")
    run(moe, output, overwrite, add=add, expand_from=from_, freeze_old=freeze == "old", noise=noise, dtype=dtype,
        seed=seed, max_shard_size=max_shard_size)


def run(name: str, output: Path, overwrite: bool, add: int, expand_from: str | None, freeze_old: bool,
        **options) -> None:
    """Resolve the MoE (and a dense --from model), convert, print the summary and how exact it is."""
    from moeify import conversion
    from moeify.expand import BUSIEST, COPY, measured, prepare

    expand_from = expand_from or BUSIEST
    names = [name] + ([expand_from] if not expand_from.startswith(COPY) else [])
    with claim(output, overwrite, protect=names, notify=ui.say) as out:  # before any download, held to the end
        folders = {n: source.resolve(n, notify=ui.say) for n in names}
        out.protect(*folders.values())
        growth = prepare(folders[name], name, add, expand_from, freeze_old, folders, **options)
        with ui.byte_progress("writing") as (set_total, advance):
            result = conversion.convert(folders[name], out, growth.spec, source=name, transform=growth.transform,
                                        adapter=growth.reader, notes=lambda: {"expansion": growth.notes},
                                        overwrite=overwrite, on_plan=set_total, on_bytes=advance)
    ui.conclude(result)
    diff = measured(folders[name], Path(output))
    claim_ = "exact by construction (selection bias)" if growth.notes["exact_at_init"] else "not guaranteed"
    said = "not measured (no tokenizer)" if diff is None else f"max |logit difference| {diff:.3g}"
    ui.result(f"step 0: {claim_}; against {name} on the built-in text: {said}")
