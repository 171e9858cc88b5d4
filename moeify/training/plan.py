"""Everything a run needs, checked before anything is written or any model is loaded.

Each bad input is one MoeifyError: a dense model, a folder that is not a moeify output, data
that is missing, empty or too short, a sequence longer than the model's positions, a teacher
with another vocabulary, a checkpoint of another run, an output in the way.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from moeify import documents, source
from moeify.checkpoint import read_json_object
from moeify.errors import MoeifyError
from moeify.loading import Code, code_of, tokenizer_in
from moeify.output import check_output, refuse_replacing
from moeify.spec import Mode
from moeify.training import data, lora
from moeify.training.checkpoints import Checkpoints
from moeify.training.settings import Objective, Settings
from moeify.verify import read_config, routing_of

Notify = Callable[[str], None]


@dataclass
class Plan:
    model: str  # as the user named it
    model_dir: Path
    code: Code  # whose Python builds the model (see moeify.loading)
    record: dict  # the model's moeify.json
    settings: Settings  # complete: the job's defaults filled in
    corpus: data.Corpus
    teacher: str | None  # as named (--teacher or the recorded source); None: no teacher at all
    teacher_dir: Path | None
    teacher_code: Code | None
    steps: int
    output: Path
    checkpoints: Checkpoints
    resume_from: Path | None
    run: dict  # what a checkpoint must match to be resumed
    overwrite: bool = False  # replace an existing output (and earlier checkpoints)
    notes: list[str] = field(default_factory=list)  # said when training starts, after every refusal

    @property
    def tokens_per_step(self) -> int:
        s = self.settings
        return s.sequences_per_step * s.seq_len


def make(model: str, output: Path, settings: Settings, *, processes: int = 1, overwrite: bool = False,
         checkpoint_dir: Path | None = None, resume: bool = False, trust_remote_code: bool = False,
         notify: Notify = lambda line: None) -> Plan:
    output = Path(output).absolute()
    check_output(output, overwrite)
    model_dir = source.resolve(model, notify)
    record = _record(model, model_dir)
    code = code_of(model_dir, trust_remote_code)
    settings = settings.for_job(Mode(record.get("mode", Mode.UPCYCLE.value)))
    if settings.objective is Objective.LOCAL and processes > 1:
        raise MoeifyError("--objective local trains in one process (it calls the MoE blocks directly, past "
                          "the data-parallel wrapper); launch it without accelerate or use --objective global")
    if settings.lora_rank is not None:
        lora.require_peft()
    if settings.batch_size % processes:
        raise MoeifyError(f"--batch-size {settings.batch_size} must divide evenly over the {processes} processes")
    tokenizer = tokenizer_in(model_dir, code)
    if tokenizer is None:
        raise MoeifyError(f"{model} has no tokenizer; copy its source's tokenizer files into {model_dir}")
    _check_positions(model_dir, settings.seq_len)
    data.check_sources(settings)
    checkpoints = Checkpoints(checkpoint_dir or output.with_name(output.name + ".checkpoints"), settings.keep)
    if not resume and checkpoints.complete() and not overwrite:
        raise MoeifyError(f"{checkpoints.folder} holds checkpoints of an earlier run; pass --resume to continue "
                          f"it or --overwrite to start over")
    notes: list[str] = []
    teacher, teacher_dir, teacher_code = _teacher(settings, record, model_dir, tokenizer, trust_remote_code, notes)
    # Before hours of training: writing the output replaces it whole.
    refuse_replacing(output, [model_dir, teacher_dir, settings.data, settings.eval_text])
    _checkpoints_apart(checkpoints.folder, {"output": output, "model": model_dir, "teacher": teacher_dir})
    # The data last: a stream from the Hub may take long to read, so every cheaper check comes first.
    corpus = data.corpus(settings.data, settings.eval_text, settings.eval_fraction, settings.seq_len, tokenizer,
                         _tokens(settings))
    steps = _steps(settings, len(corpus.train))
    notes += _repetition(settings, steps, len(corpus.train))
    run = _identity(model_dir, settings, processes, corpus)
    resume_from = checkpoints.check_resumable(run) if resume else None
    return Plan(model, model_dir, code, record, settings, corpus, teacher, teacher_dir, teacher_code, steps, output,
                checkpoints, resume_from, run, overwrite, notes)


def _checkpoints_apart(folder: Path, places: dict[str, Path | None]) -> None:
    """Checkpoints inside the output would be deleted when the trained model replaces it (and make it
    a folder with files, which only --overwrite may replace, once training is over); inside the model
    or the teacher (None: none), they would change a folder moeify only reads."""
    if folder.exists() and not folder.is_dir():
        raise MoeifyError(f"the checkpoint folder {folder} is a file; choose another --checkpoint-dir")
    folder = folder.resolve()
    for what, place in ((what, place.resolve()) for what, place in places.items() if place is not None):
        if folder == place or place in folder.parents:
            raise MoeifyError(f"the checkpoint folder {folder} is inside the {what} {place}; choose "
                              f"another --checkpoint-dir (or output folder) outside it")


def _record(model: str, folder: Path) -> dict:
    config = read_config(folder)
    if routing_of(config) is None:
        raise MoeifyError(f"{model} is a dense model; run `moeify upcycle` or `moeify split` on it first, "
                          f"then train the output")
    path = folder / "moeify.json"
    if not path.is_file():
        raise MoeifyError(f"{model} has no moeify.json: `moeify train` continues moeify outputs; convert with "
                          f"`moeify upcycle` or `moeify split` first")
    return read_json_object(path, "restore it from the conversion")


def _check_positions(folder: Path, seq_len: int) -> None:
    positions = read_config(folder).get("max_position_embeddings")
    if positions and seq_len > positions:
        raise MoeifyError(f"--seq-len {seq_len} is beyond the model's {positions} positions; "
                          f"use --seq-len {positions} or less")


def _teacher(settings: Settings, record: dict, model_dir: Path, tokenizer, trust_remote_code: bool,
             notes: list[str]) -> tuple[str | None, Path | None, Code | None]:
    """The teacher's name, folder and code. Needed for distillation and --objective local; otherwise
    only for the perplexity ratio, which is worth having but not worth failing for."""
    needed = settings.distill > 0 or settings.objective is Objective.LOCAL
    try:
        name, folder = _teacher_folder(settings.teacher, record, notes)
        return name, folder, _compatible(name, folder, model_dir, tokenizer, trust_remote_code)
    except MoeifyError as e:
        if needed or settings.teacher is not None:
            raise
        notes.append(f"no perplexity ratio to the source: {e}")
        return None, None, None


def _teacher_folder(given: str | None, record: dict, notes: list[str]) -> tuple[str, Path]:
    """--teacher, or the source moeify.json records, checked against the weights it records.

    moeify.json names a local source by its folder name only (no path): that name resolves from
    the current folder, and only when the weights there are the recorded ones.
    """
    recorded = record.get("resolved") if isinstance(record.get("resolved"), dict) else None
    if given is not None:
        folder = source.resolve(given, notes.append)
        if recorded and not source.same_source(recorded, source.provenance(folder)):
            notes.append(f"the teacher {given} is not the model this one was made from ({source.identity(recorded)}); "
                   f"distilling from it as asked")
        return given, folder
    name = record.get("source")
    if not name:
        raise MoeifyError("moeify.json names no source to learn from; pass --teacher SOURCE")
    try:
        folder = source.resolve(name, notes.append)
    except MoeifyError:
        raise MoeifyError(f"the source recorded in moeify.json, {name!r}, is not found from here; pass "
                          f"--teacher with its path") from None
    if recorded and not source.same_source(recorded, source.provenance(folder)):
        raise MoeifyError(f"{name!r} here is not the source this model was made from ({source.identity(recorded)}); "
                          f"pass --teacher with the right one")
    return name, folder


def _compatible(name: str, folder: Path, model_dir: Path, tokenizer, trust_remote_code: bool) -> Code:
    """The teacher's code, once its vocabulary is known to be the student's."""
    code = code_of(folder, trust_remote_code)
    theirs = tokenizer_in(folder, code)
    if theirs is not None and theirs.get_vocab() != tokenizer.get_vocab():
        raise MoeifyError(f"teacher {name} has another tokenizer vocabulary than the student; distill from "
                          f"the model it was converted from (or one sharing its tokenizer)")
    sizes = read_config(folder).get("vocab_size"), read_config(model_dir).get("vocab_size")
    if sizes[0] != sizes[1]:
        raise MoeifyError(f"teacher {name} has {sizes[0]} vocabulary entries, the student {sizes[1]}; "
                          f"they must share one vocabulary")
    return code


def _steps(settings: Settings, sequences: int) -> int:
    """Optimizer steps: --steps or --max-tokens, whichever ends first; neither: one pass over the data."""
    per_step = settings.sequences_per_step
    limits = []
    if settings.steps is not None:
        limits.append(settings.steps)
    if settings.max_tokens is not None:
        limits.append(math.ceil(settings.max_tokens / (per_step * settings.seq_len)))
    return min(limits) if limits else math.ceil(sequences / per_step)


def _repetition(settings: Settings, steps: int, sequences: int) -> list[str]:
    """A note when the run reads its data more than once: held-out perplexity stops falling sooner on
    repeated text (benchmarks/heal.py), and a stream shorter than the run is otherwise silent."""
    passes = steps * settings.sequences_per_step / sequences
    if passes <= 1 or (settings.steps is None and settings.max_tokens is None):  # one pass, rounded up to a step
        return []
    return [(f"--data gives {sequences * settings.seq_len:,} training tokens; {steps} steps read them {passes:.1f} "
             f"times over (more varied text heals further)")]


def _tokens(settings: Settings) -> int | None:
    """The tokens --steps or --max-tokens will train on (None: neither given, one pass over the data)."""
    steps = _steps(settings, 0)
    return steps * settings.sequences_per_step * settings.seq_len if steps else None


def _identity(model_dir: Path, settings: Settings, processes: int, corpus: data.Corpus) -> dict:
    """What makes a run this run: the model's config, the data (a file's bytes, a stream's tokens),
    every trajectory setting."""
    digests = {"model_config": _sha256(model_dir / "config.json"),
               "data_sha256": _data_sha256(settings.data, corpus.train)}
    if settings.eval_text:
        digests["eval_text_sha256"] = _data_sha256(settings.eval_text, corpus.held_out)
    return {"model": str(model_dir.resolve()), **digests, "processes": processes, **settings.trajectory()}


def _data_sha256(path: str, sequences) -> str:
    """A file's bytes; for a stream (a dataset folder, a Hub dataset), the tokens read from it."""
    if documents.is_stream(path):
        return hashlib.sha256(sequences.numpy().tobytes()).hexdigest()
    return _sha256(Path(path).expanduser())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
