"""`moeify apply`: run a conversion written down as a recipe (YAML, or an output's moeify.json).

Examples:

    moeify apply recipes/mixtral.yaml mistral-7b --output mixtral-upcycled
    moeify apply deepseekmoe smollm2-135m --output smollm2-deepseekmoe          # a shipped recipe, by name
    moeify apply recipes/switch.yaml ./my-llama --experts 16 --output my-llama-switch16
    moeify apply smollm2-8x135m/moeify.json --output replayed                  # replay, same source
    moeify apply recipes/split.yaml ./my-llama --set partition=cluster --output my-llama-split
    moeify apply split-heal smollm2-135m --set train.data=notes.txt --output smollm2-split8-healed
"""

from __future__ import annotations

from typing import Annotated

import typer

from moeify import recipe as recipes
from moeify import source, ui
from moeify.commands import options
from moeify.commands import train as train_recipe
from moeify.commands.options import OutputOpt, OverwriteOpt, optional
from moeify.commands.upcycle import run
from moeify.errors import MoeifyError
from moeify.spec import Mode, Spec

RecipeArg = Annotated[str, typer.Argument(metavar="RECIPE", help="A recipe file (YAML or moeify.json) or the name "
                                          "of a shipped recipe: " + ", ".join(recipes.shipped()) + ".")]
SourceOpt = Annotated[str | None, typer.Argument(metavar="[SOURCE]", help="Model folder, .gguf file, Hub repo id or "
                                                 "alias. Default: the recipe's `source` (a moeify.json has one).")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", metavar="FIELD=VALUE",
                                                  help="Override any recipe field, e.g. --set partition=cluster.")]


def apply(
    recipe_: RecipeArg,
    output: OutputOpt,
    source_: SourceOpt = None,
    experts: optional(options.ExpertsOpt) = None,
    topk: optional(options.TopkOpt) = None,
    granularity: optional(options.GranularityOpt) = None,
    shared_experts: optional(options.SharedOpt) = None,
    moe_layers: optional(options.LayersOpt) = None,
    format_: optional(options.FormatOpt) = None,
    dtype: optional(options.DTypeOpt) = None,
    router_init: optional(options.RouterInitOpt) = None,
    router_std: optional(options.RouterStdOpt) = None,
    noise: optional(options.NoiseOpt) = None,
    drop_ratio: optional(options.DropOpt) = None,
    seed: optional(options.SeedOpt) = None,
    max_shard_size: optional(options.ShardOpt) = None,
    set_: SetOpt = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Convert SOURCE as RECIPE says; options given here override the recipe's fields.

    Replaying an output's moeify.json on the same source with the same seed reproduces the
    conversion bit for bit.

    Examples:

    moeify apply mixtral mistral-7b --output mistral-8x7b

    moeify apply recipes/switch.yaml ./my-llama --experts 16 --output my-llama-switch16

    moeify apply smollm2-8x135m/moeify.json --output replayed
    """
    from moeify import mergekit  # torch, through merge: imported when a recipe runs, not for --help

    given = dict(experts=experts, topk=topk, granularity=granularity, shared_experts=shared_experts,
                 moe_layers=moe_layers, format=format_, dtype=dtype, router_init=router_init,
                 router_std=router_std, noise=noise, drop_ratio=drop_ratio, seed=seed,
                 max_shard_size=max_shard_size)
    overrides = {k: v for k, v in given.items() if v is not None} | recipes.parse_assignments(set_ or [])
    data = recipes.read(recipes.find(recipe_))
    if mergekit.is_config(data):  # a mergekit-moe config: the same merge, as moeify does it
        base, fields, notes = mergekit.recipe(data)
        for note in notes:
            ui.say(f"note: {note}")
        data = fields | {"source": base}
    training = train_recipe.recipe_section(data, overrides)  # checked before anything is converted
    spec = recipes.spec_of(data, overrides)
    source_name = source_ or data.get("source")
    if not source_name:
        raise MoeifyError("this recipe names no source; pass SOURCE after the recipe")
    _check_replay(data, source_name, explicit=source_ is not None)
    final, output = output, train_recipe.converted(output, overwrite, training, source_name) if training else output
    if spec.mode is Mode.SPLIT:
        _split(source_name, output, spec, overwrite)
    elif spec.mode is Mode.MERGE:
        from moeify.commands.merge import run as merge

        merge(source_name, output, spec, overwrite)
    elif spec.mode is Mode.EXPAND:
        from moeify.commands.expand import run as expand

        expand(source_name, output, overwrite, add=spec.add, expand_from=spec.expand_from, freeze_old=spec.freeze_old,
               noise=spec.noise, dtype=spec.dtype, seed=spec.seed, max_shard_size=spec.max_shard_size)
    else:
        run(source_name, output, spec, overwrite)
    if training is not None:
        train_recipe.after_conversion(output, final, training, source_name, overwrite)


def _check_replay(data: dict, source_name: str, explicit: bool) -> None:
    """A moeify.json records the weights it was made from (source.provenance).

    A replay (no SOURCE given) promises the same output, so other weights behind the same name
    (a new Hub revision, the offline copy of an alias, an edited folder) are refused; a SOURCE
    given on purpose is the recipe applied to another model, which is said in one line.
    """
    recorded = data.get("resolved")
    if not isinstance(recorded, dict):
        return  # a recipe, or a moeify.json older than provenance records
    resolved = source.provenance(source.resolve(source_name, notify=ui.say))
    if source.same_source(recorded, resolved):
        return
    was, now = source.identity(recorded), source.identity(resolved)
    if explicit:
        ui.say(f"note: the recipe's conversion was made from {was}; {source_name} is {now}: not a replay")
        return
    raise MoeifyError(f"this moeify.json was made from {was}, but {source_name} is now {now}, so the replay "
                      f"would differ; pass SOURCE after the recipe to convert it anyway")


def _split(source_name: str, output, spec: Spec, overwrite: bool) -> None:
    """A split recipe runs through `moeify split`, which derives experts from the source itself."""
    from moeify.commands.split import split

    split(source_name, output, granularity=spec.granularity, topk=spec.topk, shared_experts=spec.shared_experts,
          partition=spec.partition, router_init=spec.split_router, calibration_=spec.calibration,
          calibration_tokens=spec.calibration_tokens, refit=spec.refit, moe_layers=spec.moe_layers,
          format_=spec.format, engine=spec.engine, dtype=spec.dtype, seed=spec.seed,
          max_shard_size=spec.max_shard_size, overwrite=overwrite)
