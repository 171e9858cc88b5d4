"""The training loop: one accelerate Accelerator, nothing distributed of our own.

accelerate prepares the model, optimizer, data loader and schedule; it accumulates gradients,
casts under mixed precision, wraps the model for DDP, FSDP or DeepSpeed as launched, and saves
and restores checkpoints. The loader is prepared with split_batches, so --batch-size counts
sequences over all processes together and a run reaches the same weights on 1 or N processes.
The teacher is placed by the same engine (see moeify.training.teacher: a full copy per process,
sharded under FSDP 2) and run under the same autocast; it stays out of the checkpoints.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from moeify.errors import MoeifyError
from moeify.loading import load_model, quiet_transformers
from moeify.training import display, export, frozen, lora, record
from moeify.training import teacher as teachers
from moeify.training.checkpoints import Progress, damaged
from moeify.training.data import Stream, order
from moeify.training.evaluation import perplexity
from moeify.training.objective import LocalLoss, Loss, RouterCoefficients, Weights
from moeify.training.plan import Plan
from moeify.training.selection import groups, select
from moeify.training.settings import Objective, Precision, Schedule, Settings
from moeify.verify import blocks

Notify = Callable[[str], None]


@dataclass
class Outcome:
    """What a run did, for the summary table, moeify.json and the card."""

    output: Path
    trainable: str
    trainable_params: int
    steps: int
    tokens: int
    seconds: float
    before: float  # held-out perplexity before training
    after: float
    teacher_perplexity: float | None
    checkpoints: Path
    evaluations: list[dict] = field(default_factory=list)


@contextmanager
def accelerator_for(settings: Settings, notify: Notify) -> Iterator:
    """The run's Accelerator. In a single process its global state is reset afterwards, so one
    Python process can run several trainings with different settings (tests, recipes)."""
    from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs, PartialState
    from accelerate.state import AcceleratorState, GradientState

    cpu = _cpu_only()
    main = PartialState(cpu=cpu).is_main_process
    with _quiet():
        accelerator = Accelerator(
            cpu=cpu,
            mixed_precision=_precision(settings.precision, notify if main else lambda line: None),
            gradient_accumulation_steps=settings.grad_accum,
            dataloader_config=DataLoaderConfiguration(split_batches=True),
            kwargs_handlers=[DistributedDataParallelKwargs()],  # Trainer decides find_unused_parameters
        )
        try:
            yield accelerator
        finally:
            if accelerator.num_processes == 1:
                AcceleratorState._reset_state(reset_partial_state=True)
                GradientState._reset_state()


def _cpu_only() -> bool:
    """Several processes launched (accelerate launch --multi_gpu, torchrun) on a machine without an
    accelerator: accelerate runs them as one job over gloo only when told to use the CPU."""
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    has_device = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    return processes > 1 and not has_device


@contextmanager
def _quiet() -> Iterator[None]:
    """No loading bars or reports from transformers and no notes from accelerate's checkpoint writer
    (it drops the tied lm_head copy and says so each time): the run has its own bar and log."""
    import logging

    chatty = logging.getLogger("accelerate.utils.other")
    level = chatty.level
    chatty.setLevel(logging.ERROR)
    try:
        with quiet_transformers():
            yield
    finally:
        chatty.setLevel(level)


def _precision(wanted: Precision, notify: Notify) -> str | None:
    """accelerate's mixed_precision value; None lets a launcher's config decide."""
    gpu = torch.cuda.is_available()
    if wanted is Precision.AUTO:
        if os.environ.get("ACCELERATE_MIXED_PRECISION", "no") != "no":  # a launcher's config asked for it
            return None
        return "bf16" if gpu and torch.cuda.is_bf16_supported() else "no"
    if wanted is Precision.FP16 and not gpu:
        notify("--precision fp16 needs a GPU; training in fp32 on this CPU")
        return "no"
    return {Precision.BF16: "bf16", Precision.FP16: "fp16", Precision.FP32: "no"}[wanted]


class Trainer:
    def __init__(self, plan: Plan, accelerator, notify: Notify):
        from accelerate.utils import set_seed

        self.plan, self.acc, self.s = plan, accelerator, plan.settings
        self.notify = notify if accelerator.is_main_process else (lambda line: None)
        self.lr = 0.0  # the learning rate of the last optimizer step, for the log
        set_seed(self.s.seed)
        student = self._student(accelerator.distributed_type.value)
        self.selection = select(student, self.s.train, self.s.freeze)
        frozen.keep(student, frozen.find(student), accelerator.distributed_type.value)
        if self.selection.undecayed:
            self.notify("the fused expert tensors that hold frozen experts train without weight decay")
        # Experts run as separate modules (remote format) get no gradient on a process whose tokens
        # chose none of them: DDP must then not wait for them. Fused experts (native) always run.
        accelerator.ddp_handler.find_unused_parameters = _separate_experts(student)
        self.teacher = teachers.place(load_model(plan.teacher_dir, plan.teacher_code), accelerator) \
            if plan.teacher_dir else None
        if self.teacher is not None and (held := teachers.share(self.teacher)) < 1:
            self.notify(f"teacher sharded by FSDP: the main process holds {held:.0%} of its parameters")
        optimizer = torch.optim.AdamW(groups(self.selection, self.s.lr, self.s.router_lr, self.s.weight_decay),
                                      lr=self.s.lr)
        micro_steps = plan.steps * self.s.grad_accum
        stream = Stream(plan.corpus.train, order(len(plan.corpus.train), micro_steps * self.s.batch_size, self.s.seed))
        loader = DataLoader(stream, batch_size=self.s.batch_size, drop_last=True)
        self.model, self.optimizer, self.loader, self.scheduler = accelerator.prepare(
            student, optimizer, loader, _schedule(optimizer, self.s, plan.steps))
        self.loss = self._objective(student)
        self.progress = Progress()

    def _student(self, distributed: str) -> torch.nn.Module:
        """The model to train; with --lora-rank, wrapped by peft with adapters on its experts."""
        student = load_model(self.plan.model_dir, self.plan.code)
        if self.s.lora_rank is None:
            return student
        if distributed in ("FSDP", "DEEPSPEED"):
            raise MoeifyError(f"--lora-rank runs on one process or DDP; {distributed} would have to gather the "
                              f"experts to merge the adapters; launch with recipes/accelerate/ddp.yaml")
        if frozen.find(student):
            raise MoeifyError("--lora-rank would adapt the experts config.json keeps frozen (frozen_experts); "
                              "train this model without --lora-rank")
        return lora.wrap(student, self.s.lora_rank, self.s.lora_alpha)

    def _objective(self, student: torch.nn.Module):
        if self.s.objective is Objective.LOCAL:  # the student's blocks are called directly: one process
            return LocalLoss(student, self.teacher, self.acc.autocast)
        weights = Weights(self.s.distill, self.s.lm, self.s.aux, self.s.temperature)
        teacher = self._teacher_logits if self.s.distill > 0 else None
        return Loss(weights, RouterCoefficients.of(student.config), teacher)

    def _teacher_logits(self, ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), self.acc.autocast():
            return self.teacher(input_ids=ids).logits

    # ------------------------------------------------------------------------ the run

    def run(self) -> Outcome:
        plan, acc = self.plan, self.acc
        for note in plan.notes:
            self.notify(note)
        if plan.resume_from is not None:
            self._resume()
        elif acc.is_main_process:
            plan.checkpoints.clear()  # --overwrite was given if there was anything to clear
        acc.wait_for_everyone()
        journal = display.Journal(plan.checkpoints.folder / export.LOG, acc.is_main_process, self.progress.step)
        teacher_ppl = self._teacher_perplexity()
        # A resumed run scores the checkpoint too (said, not recorded): a check that it reproduces.
        self._evaluate(journal, record=not self.progress.evaluations)
        self._loop(journal)
        if self.progress.evaluations[-1]["step"] != self.progress.step:
            self._evaluate(journal)
        outcome = self._outcome(teacher_ppl)
        self._export(outcome)
        return outcome

    def _loop(self, journal: display.Journal) -> None:
        skip = self.progress.step * self.s.grad_accum
        batches = self.acc.skip_first_batches(self.loader, skip) if skip else self.loader
        self.model.train()
        sums: dict[str, torch.Tensor] = {}
        watch, session = Stopwatch(), Progress()
        with display.Bar(self.plan.steps, self.progress.step, self.acc.is_main_process) as bar:
            for ids in batches:
                self._micro_step(ids, sums)
                if not self.acc.sync_gradients:
                    continue
                spent = watch.lap()  # logging the step before counts: it is part of the loop's cost
                for progress in (self.progress, session):
                    progress.step, progress.tokens = progress.step + 1, progress.tokens + self.plan.tokens_per_step
                    progress.seconds += spent
                self._log(journal, bar, sums, session.tokens / session.seconds)
                sums = {}
                with watch.paused():  # evaluations and checkpoints are not training time
                    self._between_steps(journal)

    def _micro_step(self, ids: torch.Tensor, sums: dict[str, torch.Tensor]) -> None:
        """Forward, backward and (at the last micro-step of a step) the optimizer; ids (B, L)."""
        acc = self.acc
        with acc.accumulate(self.model):
            total, terms = self.loss(self.model, ids)
            acc.backward(total)
            if acc.sync_gradients and self.s.clip > 0:
                acc.clip_grad_norm_(self.model.parameters(), self.s.clip)
            self.optimizer.step()
            self.lr = max(self.scheduler.get_last_lr())  # the rate this step used; the log says it
            self.scheduler.step()
            self.optimizer.zero_grad()
        for name, value in (terms | {"loss": total.detach()}).items():
            sums[name] = sums.get(name, 0) + value

    def _log(self, journal: display.Journal, bar: display.Bar, sums: dict[str, torch.Tensor], rate: float) -> None:
        step = self.progress.step
        if step % self.s.log_every and step != self.plan.steps:
            bar.update(step, "")
            return
        names = sorted(sums)
        means = self.acc.reduce(torch.stack([sums[n].float() for n in names]), reduction="mean") / self.s.grad_accum
        terms = dict(zip(names, means.tolist()))
        journal.write({"step": step, "tokens": self.progress.tokens, "lr": self.lr, **terms,
                       "seconds": round(self.progress.seconds, 3)})
        bar.update(step, display.line(terms, self.lr, rate))

    def _between_steps(self, journal: display.Journal) -> None:
        step, s = self.progress.step, self.s
        if s.eval_every and step % s.eval_every == 0 and step != self.plan.steps:
            self._evaluate(journal)
        if s.save_every and step % s.save_every == 0:
            self.plan.checkpoints.save(self.acc, self.progress, self.plan.run)

    def _evaluate(self, journal: display.Journal, record: bool = True) -> float:
        ppl = perplexity(self.model, self.plan.corpus.held_out, self.acc, trained=True)
        if record:
            self.progress.evaluations.append({"step": self.progress.step, "perplexity": ppl})
            journal.write({"step": self.progress.step, "eval_perplexity": ppl})
        else:
            self.notify(f"held-out perplexity at step {self.progress.step}: {ppl:.4f}")
        return ppl

    def _teacher_perplexity(self) -> float | None:
        if self.teacher is None:
            return None
        ppl = perplexity(self.teacher, self.plan.corpus.held_out, self.acc)
        if self.s.distill == 0 and self.s.objective is Objective.GLOBAL:
            self.teacher = None  # it was only needed for the ratio
        return ppl

    def _resume(self) -> None:
        path = self.plan.resume_from
        self.plan.checkpoints.drop_partial()
        self.progress = self.plan.checkpoints.progress(path)
        if self.progress.step > self.plan.steps:
            raise damaged(path, f"it says step {self.progress.step} of a run of {self.plan.steps}")
        try:
            self.acc.load_state(str(path))
        except (OSError, MemoryError, torch.OutOfMemoryError):  # the machine's trouble (disk, memory): as it is
            raise
        except Exception as e:  # noqa: BLE001 -- a file cut short, another model's weights, pickled garbage
            raise damaged(path, f"{type(e).__name__} while loading it; or saved by other versions of torch "
                                f"and accelerate") from None
        self.notify(f"resuming from {path} (step {self.progress.step} of {self.plan.steps})")

    # ------------------------------------------------------------------------ the result

    def _outcome(self, teacher_ppl: float | None) -> Outcome:
        p = self.progress
        return Outcome(self.plan.output, self.s.train.value, sum(t.numel() for t in self.selection.trainable.values()),
                       p.step, p.tokens, p.seconds, p.evaluations[0]["perplexity"], p.evaluations[-1]["perplexity"],
                       teacher_ppl, self.plan.checkpoints.folder, p.evaluations)

    def _export(self, outcome: Outcome) -> None:
        state = self.acc.get_state_dict(self.model)  # gathered from the shards under FSDP and ZeRO-3
        model, adapter = self.acc.unwrap_model(self.model), None
        if self.s.lora_rank is not None and self.acc.is_main_process:
            adapter = None if self.s.merge_lora else self.plan.checkpoints.folder / ".adapter"
            model = lora.unwrap(model, self.s.merge_lora, adapter)
            state = model.state_dict()
        if self.acc.is_main_process:
            export.write(model, state, self.plan.model_dir, self.plan.output,
                         overwrite=self.plan.overwrite, entry=record.entry(self.plan, outcome, self.acc.num_processes),
                         section=record.section(self.plan, outcome),
                         log=self.plan.checkpoints.folder / export.LOG, adapter=adapter)
        self.acc.wait_for_everyone()


class Stopwatch:
    """Training time: wall time between laps, minus the pauses."""

    def __init__(self):
        self.mark = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        spent, self.mark = now - self.mark, now
        return spent

    @contextmanager
    def paused(self) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.mark += time.perf_counter() - start


def _separate_experts(model: torch.nn.Module) -> bool:
    return any(isinstance(block.experts, torch.nn.ModuleList) for block in blocks(model).values())


def _schedule(optimizer, s: Settings, steps: int):
    from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

    warmup = s.warmup if s.warmup is not None else round(0.05 * steps)
    if s.schedule is Schedule.CONSTANT:
        return get_constant_schedule_with_warmup(optimizer, warmup)
    return get_cosine_schedule_with_warmup(optimizer, warmup, steps)
