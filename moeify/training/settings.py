"""One validated, frozen description of a training run: what trains, on what, towards what.

The command line builds it, a recipe's `train:` section builds it, and the trained output's
moeify.json records it. Fields left None are chosen by the job (healing a split or continuing
an upcycle) once the model is known, so the recorded settings are always complete.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from enum import Enum
from typing import Any

from moeify.errors import MoeifyError
from moeify.spec import Mode


class Trainable(str, Enum):
    ROUTERS = "routers"  # the routers only: cheap, the first step after a split
    EXPERTS = "experts"  # routed experts and their routers
    MOE = "moe"  # every parameter of the MoE blocks (shared experts and gates too)
    ALL = "all"  # every parameter of the model


class Precision(str, Enum):
    AUTO = "auto"  # bf16 on a GPU that has it, fp32 otherwise
    BF16 = "bf16"
    FP16 = "fp16"  # needs a GPU; falls back to fp32 elsewhere
    FP32 = "fp32"


class Schedule(str, Enum):
    COSINE = "cosine"  # linear warmup, then cosine decay to zero
    CONSTANT = "constant"  # linear warmup, then constant


class Objective(str, Enum):
    GLOBAL = "global"  # the weighted loss terms on the whole model's outputs
    LOCAL = "local"  # each MoE layer reproduces its dense FFN's output on the same hidden states


@dataclass(frozen=True)
class Job:
    """The defaults of one of the two common jobs."""

    train: Trainable
    distill: float
    lm: float
    lr: float


# Healing a split: routers learn to pick the pieces the dense FFN needs, the dense model teaches.
# 1e-4: on SmolLM2's G=8 split, routers under AdamW at a constant 1e-3 diverged after ~10 steps and
# 3e-4 after ~15, while 1e-4 kept improving (benchmarks/heal.py --lr).
HEAL = Job(train=Trainable.ROUTERS, distill=1.0, lm=0.0, lr=1e-4)
# Continuing an upcycle: the experts copies specialise on the data, balanced by the aux loss.
CONTINUE = Job(train=Trainable.MOE, distill=0.0, lm=1.0, lr=1e-4)
JOBS = {Mode.SPLIT: HEAL, Mode.UPCYCLE: CONTINUE}


@dataclass(frozen=True)
class Settings:
    data: str  # a file, dataset folder or Hub dataset name (moeify.documents)
    eval_text: str | None = None  # held-out text file; None: the last eval_fraction of the data
    eval_fraction: float = 0.05  # share of the packed data's sequences held out (from its end)
    seq_len: int = 256  # tokens per packed training sequence
    batch_size: int = 8  # sequences per micro-step, over all processes together
    grad_accum: int = 1  # micro-steps per optimizer step
    steps: int | None = None  # optimizer steps; None with max_tokens None: one pass over the data
    max_tokens: int | None = None  # training tokens; whichever of steps and max_tokens ends first
    train: Trainable | None = None  # None: the job's
    freeze: tuple[str, ...] = ()  # parameter-name patterns kept frozen on top of `train`
    objective: Objective = Objective.GLOBAL
    distill: float | None = None  # weight of KL(teacher || student); None: the job's
    lm: float | None = None  # weight of the next-token cross-entropy on the data; None: the job's
    aux: float = 1.0  # multiplies the model's own router loss coefficients (0: no aux loss)
    temperature: float = 1.0  # of the distillation softmaxes
    teacher: str | None = None  # None: the `source` in the model's moeify.json
    lr: float | None = None  # None: the job's
    router_lr: float | None = None  # None: lr
    weight_decay: float = 0.01  # AdamW's; never on norms and biases
    warmup: int | None = None  # warmup steps; None: 5% of the steps
    schedule: Schedule = Schedule.COSINE
    clip: float = 1.0  # gradient norm clipping; 0 turns it off
    seed: int = 0  # data order and everything random
    precision: Precision = Precision.AUTO
    eval_every: int = 0  # steps between held-out evaluations (0: before and after only)
    save_every: int = 100  # steps between checkpoints (0: none)
    keep: int = 2  # checkpoints kept
    log_every: int = 1  # steps between lines of train_log.jsonl
    lora_rank: int | None = None  # LoRA adapters of this rank train instead of the expert weights; None: off
    lora_alpha: float | None = None  # LoRA scale numerator (the update is alpha / rank * B A); None: the rank
    merge_lora: bool = True  # adapters merged into the written weights; False: written beside, in DIR/adapter

    # Fields that only say how the run is watched or saved: a resumed run may change them.
    RUNTIME = frozenset({"eval_every", "save_every", "keep", "log_every", "merge_lora"})

    def __post_init__(self) -> None:
        for f in fields(self):  # strings from YAML or the command line become enums once, here
            value = getattr(self, f.name)
            kind = _enum_type(f.name)
            if kind is not None and value is not None and not isinstance(value, kind):
                object.__setattr__(self, f.name, _enum(kind, f.name, value))
        object.__setattr__(self, "freeze", tuple(self.freeze))
        self._validate()

    def _validate(self) -> None:
        _at_least(1, seq_len=self.seq_len, batch_size=self.batch_size, grad_accum=self.grad_accum,
                  steps=self.steps, max_tokens=self.max_tokens, keep=self.keep, log_every=self.log_every,
                  lora_rank=self.lora_rank)
        _at_least(0, eval_every=self.eval_every, save_every=self.save_every, warmup=self.warmup,
                  distill=self.distill, lm=self.lm, aux=self.aux, clip=self.clip, weight_decay=self.weight_decay)
        if not 0 <= self.eval_fraction < 1:
            raise MoeifyError(f"--eval-fraction must be in [0, 1) (got {self.eval_fraction})")
        if self.temperature <= 0:
            raise MoeifyError(f"--temperature must be positive (got {self.temperature})")
        for name in ("lr", "router_lr"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise MoeifyError(f"--{name.replace('_', '-')} must be positive (got {value})")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            raise MoeifyError(f"--lora-alpha must be positive (got {self.lora_alpha})")
        if self.lora_alpha is not None and self.lora_rank is None:
            raise MoeifyError("--lora-alpha scales LoRA adapters; give --lora-rank too")
        if self.distill == 0 and self.lm == 0 and self.aux == 0:
            raise MoeifyError("every loss weight is 0 (--distill, --lm, --aux); give at least one a weight")

    @property
    def sequences_per_step(self) -> int:
        """Sequences in one optimizer step, over every process and accumulated micro-batch."""
        return self.batch_size * self.grad_accum

    def for_job(self, mode: Mode) -> Settings:
        """Every None the job decides, filled in from the job's defaults."""
        job = JOBS.get(mode, CONTINUE)
        chosen = {name: getattr(job, name) for name in ("train", "distill", "lm", "lr")
                  if getattr(self, name) is None}
        done = dataclasses.replace(self, **chosen)
        if done.router_lr is None:
            done = dataclasses.replace(done, router_lr=done.lr)
        return done

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}

    def trajectory(self) -> dict[str, Any]:
        """The fields that decide the weights a run reaches: a checkpoint resumes only with the same."""
        return {k: v for k, v in self.to_dict().items() if k not in self.RUNTIME}

    @classmethod
    def from_recipe(cls, section: object, overrides: dict[str, Any] | None = None) -> Settings:
        """A recipe's `train:` section, with --set train.FIELD=VALUE on top, types checked for YAML."""
        if not isinstance(section, dict):
            raise MoeifyError("a recipe's train: section must be a mapping of training fields (like steps: 200)")
        data = {**section, **(overrides or {})}
        if "data" not in data:
            raise MoeifyError("the recipe trains but names no data; pass --set train.data=FILE (.txt, .jsonl, .parquet, .arrow, a dataset folder or a Hub dataset name)")
        return cls.from_dict({name: _typed(name, value) for name, value in data.items()})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Settings:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise MoeifyError(f"unknown training field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        if "data" not in data:
            raise MoeifyError("a training section needs `data:` (a .txt or .jsonl file)")
        return cls(**data)


_INTS = {"seq_len", "batch_size", "grad_accum", "steps", "max_tokens", "warmup", "seed", "eval_every", "save_every",
         "keep", "log_every", "lora_rank"}
_FLOATS = {"eval_fraction", "distill", "lm", "aux", "temperature", "lr", "router_lr", "weight_decay", "clip",
           "lora_alpha"}


def _typed(name: str, value: Any) -> Any:
    """A YAML value as the field wants it; a wrong type is one line naming the field.

    Floats may come as text: YAML 1.1 reads 1e-3 (no dot) as a string.
    """
    if value is None:
        return None
    if name in _INTS and (isinstance(value, bool) or not isinstance(value, int)):
        raise MoeifyError(f"recipe field train.{name} must be a whole number (got {value!r})")
    if name in _FLOATS:
        try:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        except (TypeError, ValueError):
            raise MoeifyError(f"recipe field train.{name} must be a number (got {value!r})") from None
    if name == "merge_lora" and not isinstance(value, bool):
        raise MoeifyError(f"recipe field train.merge_lora must be true or false (got {value!r})")
    if name == "freeze":
        value = [value] if isinstance(value, str) else value
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise MoeifyError(f"recipe field train.freeze must be a pattern or a list of them (got {value!r})")
    elif name in ("data", "eval_text", "teacher", *_ENUMS) and not isinstance(value, str):
        raise MoeifyError(f"recipe field train.{name} must be text (got {value!r})")
    return value


_ENUMS = {"train": Trainable, "objective": Objective, "schedule": Schedule, "precision": Precision}


def _enum_type(name: str) -> type[Enum] | None:
    return _ENUMS.get(name)


def _enum(kind: type[Enum], name: str, value: Any) -> Enum:
    try:
        return kind(value)
    except ValueError:
        choices = "|".join(member.value for member in kind)
        raise MoeifyError(f"unknown {name} {value!r}; choose one of {choices}") from None


def _at_least(low: int, **values: float | None) -> None:
    for name, value in values.items():
        if value is not None and value < low:
            raise MoeifyError(f"--{name.replace('_', '-')} must be at least {low} (got {value})")


def _plain(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    return list(value) if isinstance(value, tuple) else value
