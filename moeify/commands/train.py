"""`moeify train`: heal a split or continue training an upcycle, on one CPU or many GPUs.

Examples:

    moeify train ./smollm2-split8 --data train.txt --output smollm2-split8-healed      # routers, distilled
    moeify train ./smollm2-8x135m --data chat.jsonl --output smollm2-8x135m-tuned     # all MoE, LM + aux
    moeify train ./split --data train.txt --train moe --max-tokens 100000 --eval-text held.txt --output out
    moeify train ./split --data train.txt --freeze "*layers.0.*" --steps 500 --save-every 50 --output out
    moeify train ./split --data train.txt --output out --resume                      # after Ctrl-C
    accelerate launch --config_file recipes/accelerate/ddp.yaml -m moeify train ./split --data train.txt --output out
    accelerate launch --config_file recipes/accelerate/fsdp.yaml -m moeify train ./big --data d.jsonl --output o
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated

import typer

from moeify import ui
from moeify.commands.options import OutputOpt, OverwriteOpt
from moeify.commands.verify import TrustOpt
from moeify.errors import Interrupted
from moeify.plotting import plot_file
from moeify.training.settings import Objective, Precision, Schedule, Settings, Trainable

ModelArg = Annotated[str, typer.Argument(metavar="MODEL", help="A moeify output (folder, Hub id): native Mixtral, "
                                         "Qwen2-MoE, Qwen3-MoE or the remote format.")]
DataOpt = Annotated[str, typer.Option("--data", help="Training text: .txt; .jsonl, .parquet or .arrow with "
                                      "\"text\" or \"messages\" (rendered with the chat template); a dataset folder; "
                                      "or a Hub dataset NAME[:CONFIG], streamed (give --steps or --max-tokens).")]
TrainOpt = Annotated[Trainable | None, typer.Option("--train", help="What trains. Default: routers for a split, "
                                                    "moe for an upcycle.")]
FreezeOpt = Annotated[list[str] | None, typer.Option("--freeze", metavar="PATTERN", help="Keep parameters matching "
                                                     "this glob (or substring) frozen; repeatable.")]
TeacherOpt = Annotated[str | None, typer.Option("--teacher", help="Distillation teacher. Default: the source "
                                                "recorded in moeify.json.")]
DistillOpt = Annotated[float | None, typer.Option("--distill", help="Weight of KL(teacher||student). "
                                                  "Default: 1 for a split, 0 for an upcycle.")]
LmOpt = Annotated[float | None, typer.Option("--lm", help="Weight of the LM loss on DATA. Default: 0 for a split, "
                                             "1 for an upcycle.")]
AuxOpt = Annotated[float, typer.Option("--aux", help="Multiplies the model's own router loss coefficients.")]
TemperatureOpt = Annotated[float, typer.Option("--temperature", help="Distillation temperature.")]
ObjectiveOpt = Annotated[Objective, typer.Option("--objective", help="global: the weighted terms on the model's "
                                                 "outputs; local: each MoE layer reproduces its dense FFN on the "
                                                 "teacher's hidden states (one process).")]
SeqLenOpt = Annotated[int, typer.Option("--seq-len", help="Tokens per packed sequence.")]
BatchOpt = Annotated[int, typer.Option("--batch-size", help="Sequences per micro-step, over all processes.")]
AccumOpt = Annotated[int, typer.Option("--grad-accum", help="Micro-steps per optimizer step.")]
StepsOpt = Annotated[int | None, typer.Option("--steps", help="Optimizer steps (default: one pass over DATA).")]
MaxTokensOpt = Annotated[int | None, typer.Option("--max-tokens", help="Training tokens; whichever of --steps and "
                                                  "--max-tokens ends first.")]
LrOpt = Annotated[float | None, typer.Option("--lr", help="Peak learning rate. Default: 1e-4 (a split's "
                                             "routers or an upcycle's experts).")]
RouterLrOpt = Annotated[float | None, typer.Option("--router-lr", help="Routers' learning rate (default: --lr).")]
DecayOpt = Annotated[float, typer.Option("--weight-decay", help="AdamW weight decay (never on norms, biases).")]
WarmupOpt = Annotated[int | None, typer.Option("--warmup", help="Warmup steps (default: 5% of the steps).")]
ScheduleOpt = Annotated[Schedule, typer.Option("--schedule", help="After warmup: cosine decay or constant.")]
ClipOpt = Annotated[float, typer.Option("--clip", help="Gradient norm clipping (0: off).")]
PrecisionOpt = Annotated[Precision, typer.Option("--precision", help="auto: bf16 on a GPU that has it, else fp32.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Data order and everything random.")]
EvalTextOpt = Annotated[str | None, typer.Option("--eval-text", help="Held-out text, any kind --data takes "
                                                 "(default: the end of DATA).")]
EvalFractionOpt = Annotated[float, typer.Option("--eval-fraction", help="Share of DATA held out without "
                                                "--eval-text.")]
EvalEveryOpt = Annotated[int, typer.Option("--eval-every", help="Steps between held-out scores (0: before and "
                                           "after only).")]
SaveEveryOpt = Annotated[int, typer.Option("--save-every", help="Steps between checkpoints (0: none).")]
KeepOpt = Annotated[int, typer.Option("--keep-checkpoints", help="Checkpoints kept.")]
CheckpointDirOpt = Annotated[Path | None, typer.Option("--checkpoint-dir", help="Where checkpoints go "
                                                       "(default: DIR.checkpoints beside the output).")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue from the latest checkpoint.")]
PlotOpt = Annotated[Path | None, typer.Option("--plot", help="Write a PNG of the loss terms and held-out "
                                             "perplexity over steps.")]
LogEveryOpt = Annotated[int, typer.Option("--log-every", help="Steps between lines of train_log.jsonl.")]
LoraRankOpt = Annotated[int | None, typer.Option("--lora-rank", help="Train LoRA adapters of this rank on the "
                                                 "experts instead of their weights (needs moeify[train]).")]
LoraAlphaOpt = Annotated[float | None, typer.Option("--lora-alpha", help="LoRA scale: updates are alpha/rank "
                                                    "* BA (default: the rank).")]
MergeLoraOpt = Annotated[bool, typer.Option("--merge-lora/--no-merge-lora", help="Merge the adapters into the "
                                            "written weights, or keep them in DIR/adapter.")]


def train(
    model: ModelArg,
    data: DataOpt,
    output: OutputOpt,
    train_: TrainOpt = None,
    freeze: FreezeOpt = None,
    teacher: TeacherOpt = None,
    distill: DistillOpt = None,
    lm: LmOpt = None,
    aux: AuxOpt = 1.0,
    temperature: TemperatureOpt = 1.0,
    objective: ObjectiveOpt = Objective.GLOBAL,
    seq_len: SeqLenOpt = 256,
    batch_size: BatchOpt = 8,
    grad_accum: AccumOpt = 1,
    steps: StepsOpt = None,
    max_tokens: MaxTokensOpt = None,
    lr: LrOpt = None,
    router_lr: RouterLrOpt = None,
    weight_decay: DecayOpt = 0.01,
    warmup: WarmupOpt = None,
    schedule: ScheduleOpt = Schedule.COSINE,
    clip: ClipOpt = 1.0,
    precision: PrecisionOpt = Precision.AUTO,
    seed: SeedOpt = 0,
    eval_text: EvalTextOpt = None,
    eval_fraction: EvalFractionOpt = 0.05,
    eval_every: EvalEveryOpt = 0,
    save_every: SaveEveryOpt = 100,
    keep_checkpoints: KeepOpt = 2,
    checkpoint_dir: CheckpointDirOpt = None,
    resume: ResumeOpt = False,
    log_every: LogEveryOpt = 1,
    plot: PlotOpt = None,
    lora_rank: LoraRankOpt = None,
    lora_alpha: LoraAlphaOpt = None,
    merge_lora: MergeLoraOpt = True,
    trust_remote_code: TrustOpt = False,
    overwrite: OverwriteOpt = False,
) -> None:
    """Train a moeify output further and write it, in its own format, to DIR.

    The defaults heal a split (routers only, distilled from the source) or continue an upcycle
    (all MoE parameters, LM loss plus the router aux loss), by what moeify.json says MODEL is.

    Examples:

    moeify train ./smollm2-split8 --data train.txt --output smollm2-split8-healed

    moeify train ./smollm2-8x135m --data chat.jsonl --max-tokens 1000000 --output smollm2-8x135m-tuned

    accelerate launch --config_file recipes/accelerate/ddp.yaml -m moeify train ./split --data train.txt --output healed
    """
    settings = Settings(data=data, eval_text=eval_text, eval_fraction=eval_fraction, seq_len=seq_len,
                        batch_size=batch_size, grad_accum=grad_accum, steps=steps, max_tokens=max_tokens,
                        train=train_, freeze=tuple(freeze or ()), objective=objective, distill=distill, lm=lm,
                        aux=aux, temperature=temperature, teacher=teacher, lr=lr, router_lr=router_lr,
                        weight_decay=weight_decay, warmup=warmup, schedule=schedule, clip=clip, seed=seed,
                        precision=precision, eval_every=eval_every, save_every=save_every, keep=keep_checkpoints,
                        log_every=log_every, lora_rank=lora_rank, lora_alpha=lora_alpha, merge_lora=merge_lora)
    run(model, output, settings, overwrite=overwrite, checkpoint_dir=checkpoint_dir, resume=resume,
        trust_remote_code=trust_remote_code, plot=plot)


def run(model: str, output: Path, settings: Settings, *, overwrite: bool = False, checkpoint_dir: Path | None = None,
        resume: bool = False, trust_remote_code: bool = False, plot: Path | None = None) -> None:
    """Plan, train and write, printing on the main process only: shared with recipes' train sections."""
    from moeify.training import display
    from moeify.training import plan as plans
    from moeify.training.checkpoints import LOG
    from moeify.training.trainer import Trainer, accelerator_for

    if plot is not None:
        plot = plot_file(plot)  # before training, not after it

    with accelerator_for(settings, ui.say) as accelerator:
        say = ui.say if accelerator.is_main_process else (lambda line: None)
        plan = plans.make(model, output, settings, processes=accelerator.num_processes, overwrite=overwrite,
                          checkpoint_dir=checkpoint_dir, resume=resume, trust_remote_code=trust_remote_code,
                          notify=say)
        try:
            outcome = Trainer(plan, accelerator, say).run()
        except KeyboardInterrupt:
            if not accelerator.is_main_process:
                raise Interrupted("interrupted") from None  # the main process says the rest
            latest = plan.checkpoints.latest()
            raise Interrupted(f"interrupted: nothing written to {plan.output}; " + (
                f"continue from {latest} with --resume" if latest else "no checkpoint had been saved yet")) from None
        if accelerator.is_main_process:
            ui.show(display.summary(outcome))
            if plot is not None:
                ui.say(f"loss and perplexity curves written to {display.plot(plan.checkpoints.folder / LOG, plot)}")


# ---------------------------------------------------------------------------- recipes


def recipe_section(data: dict, overrides: dict) -> Settings | None:
    """Take a recipe's `train:` section and any --set train.FIELD=VALUE out of its conversion fields,
    validated (data file included) before the conversion starts; None when the recipe only converts."""
    from moeify.training.data import check_sources

    section = data.pop("train", None)
    given = {key.split(".", 1)[1]: overrides.pop(key) for key in list(overrides) if key.startswith("train.")}
    if section is None and not given:
        return None
    settings = Settings.from_recipe({} if section is None else section, given)
    check_sources(settings, recipe=True)
    return settings


def converted(output: Path, overwrite: bool, settings: Settings, source_name: str) -> Path:
    """Where a recipe that trains writes its conversion: DIR.converted beside the trained DIR (kept, to
    compare with `moeify verify`). DIR itself is checked now, not after a long conversion."""
    from moeify.output import check_output, refuse_replacing

    check_output(output, overwrite)
    refuse_replacing(output, [source_name, settings.teacher, settings.data, settings.eval_text])
    return output.with_name(output.name + ".converted")


def after_conversion(model: Path, output: Path, settings: Settings, source_name: str, overwrite: bool) -> None:
    """Train a recipe's fresh conversion; the recipe's source is the teacher unless the section names one."""
    teacher = settings.teacher or source_name
    run(str(model), output, dataclasses.replace(settings, teacher=teacher), overwrite=overwrite)

