"""Options shared by several commands, defined once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, get_args

import typer

from moeify.spec import DType, Engine, Format, RouterInit

SourceArg = Annotated[str, typer.Argument(metavar="SOURCE", help="Model folder, .gguf file, Hub repo id, or alias (see `moeify models`).")]
OutputOpt = Annotated[Path, typer.Option("--output", "-o", help="Folder to write the MoE checkpoint into.")]
ExpertsOpt = Annotated[int, typer.Option(help="Experts per MoE layer (copies of the FFN, before granularity).")]
TopkOpt = Annotated[int, typer.Option(help="Experts chosen per token (before granularity).")]
GranularityOpt = Annotated[int, typer.Option(help="Cut each expert into G pieces: N·G experts of 1/G size, top-k·G.")]
SharedOpt = Annotated[int, typer.Option("--shared-experts", help="Always-on shared experts per MoE layer.")]
LayersOpt = Annotated[str, typer.Option("--moe-layers", help="Layers made MoE: all, every:2, skip-first:1, or 0,2,4.")]
FormatOpt = Annotated[Format, typer.Option("--format", help="native (Mixtral, Qwen-MoE), remote (own code), or auto.")]
DTypeOpt = Annotated[DType, typer.Option(help="Output dtype; auto keeps the source's.")]
EngineOpt = Annotated[Engine, typer.Option(
    "--engine", help="Engine the output must run in exactly, else refused before writing; "
                     "any: the most portable output, and say which engines run it.")]
RouterInitOpt = Annotated[RouterInit, typer.Option("--router-init", help="How new routers start.")]
RouterStdOpt = Annotated[float, typer.Option("--router-std", help="Std of a random router.")]
NoiseOpt = Annotated[float, typer.Option(help="Std of Gaussian noise added to expert weights (0: exact copies).")]
DropOpt = Annotated[float, typer.Option("--drop-ratio", help="Drop-Upcycling: share of each expert's neurons re-initialised.")]
SeedOpt = Annotated[int, typer.Option(help="Seed for everything random in the conversion: the same seed gives the same output.")]
ShardOpt = Annotated[str, typer.Option("--max-shard-size", help="Largest output shard, e.g. 5GB or 500MB.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", metavar="", help="Replace a non-empty output folder.")]


def optional(alias: Any) -> Any:
    """The same option defaulting to None, so a command can tell what the user actually typed."""
    kind, *metadata = get_args(alias)
    return Annotated[(kind | None, *metadata)]
