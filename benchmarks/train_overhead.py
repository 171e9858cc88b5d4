"""What `moeify train`'s loop costs over a bare accelerate loop doing the same passes.

    python benchmarks/train_overhead.py                  # 3 runs of each, 10 steps, 4 x 256 tokens per step
    python benchmarks/train_overhead.py --steps 40 --runs 5 --threads 2

Model: a synthetic Mixtral (Llama 6 layers, hidden 256, FFN 1024, upcycled to 8 experts top-2 by
`moeify upcycle`: ~41M parameters, ~16M active), a character tokenizer, built once under
~/.cache/moeify/benchmarks. Job: distillation from the dense source plus the LM loss, every MoE parameter
trains (the work of healing and continued training together), fp32, one process.

Both loops run in this process, alternately (moeify then bare, then bare then moeify, ...), on
the same packed sequences in the same order: teacher forward without autograd, student forward, KL(teacher ||
student) + cross-entropy, backward, gradient clipping, AdamW, cosine schedule. Each loop is timed
from its first batch to its last step (moeify's: Trainer._loop, logging, progress bar and step
bookkeeping included, the before/after evaluations not), as wall time and as this process's CPU
time. On one thread (the default, --threads) CPU time is the work done, unmoved by other
processes sharing the machine; wall time is what a person waits. Medians over the runs.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Self

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CACHE = Path.home() / ".cache" / "moeify" / "benchmarks" / "train_overhead"
TEXT = REPO / "benchmarks" / "data" / "austen-emma.txt"
SEQ_LEN, BATCH = 256, 4


def models() -> tuple[Path, Path]:
    """The dense source and its 8-expert upcycle, made once."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from moeify.conversion import convert
    from moeify.spec import Spec
    from tests.test_split import add_char_tokenizer

    dense, moe = CACHE / "dense", CACHE / "moe"
    if not (moe / "moeify.json").is_file():
        shutil.rmtree(CACHE, ignore_errors=True)
        torch.manual_seed(0)
        config = LlamaConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=4,
                             num_key_value_heads=4, vocab_size=99, max_position_embeddings=512)
        LlamaForCausalLM(config).save_pretrained(dense)
        add_char_tokenizer(dense)
        convert(dense, moe, Spec(experts=8, topk=2, noise=0.01), source=str(dense))
    return dense, moe


def settings(steps: int):
    from moeify.training.settings import Precision, Settings, Trainable

    return Settings(data=str(TEXT), seq_len=SEQ_LEN, batch_size=BATCH, steps=steps, train=Trainable.MOE,
                    distill=1.0, lm=1.0, aux=0.0, lr=1e-4, precision=Precision.FP32, save_every=0,
                    eval_fraction=0.01)


class Clock:
    """Wall and CPU seconds of a block."""

    def __enter__(self) -> Self:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def moeify_run(dense: Path, moe: Path, steps: int) -> Clock:
    """moeify train, its loop timed."""
    import dataclasses

    from moeify.commands.train import run
    from moeify.training.trainer import Trainer

    clock, loop = Clock(), Trainer._loop

    def timed(trainer, journal):
        with clock:
            loop(trainer, journal)

    Trainer._loop = timed
    try:
        run(str(moe), CACHE / "trained", dataclasses.replace(settings(steps), teacher=str(dense)), overwrite=True)
    finally:
        Trainer._loop = loop
    return clock


def bare_run(dense: Path, moe: Path, steps: int) -> Clock:
    """A plain accelerate loop doing the same passes on the same sequences, timed."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import set_seed
    from transformers import get_cosine_schedule_with_warmup

    from moeify.loading import code_of, load_model, tokenizer_in
    from moeify.training.data import Stream, corpus, order
    from moeify.training.selection import select

    s = settings(steps)
    accelerator = Accelerator(cpu=True)
    set_seed(0)
    student, teacher = load_model(moe, code_of(moe, False)), load_model(dense, code_of(dense, False))
    teacher.requires_grad_(False).eval()
    trainable = select(student, s.train).trainable.values()
    sequences = corpus(s.data, None, s.eval_fraction, SEQ_LEN, tokenizer_in(moe, code_of(moe, False))).train
    loader = torch.utils.data.DataLoader(Stream(sequences, order(len(sequences), steps * BATCH, 0)),
                                         batch_size=BATCH)
    optimizer = torch.optim.AdamW(trainable, lr=s.lr, weight_decay=s.weight_decay)
    schedule = get_cosine_schedule_with_warmup(optimizer, round(0.05 * steps), steps)
    model, optimizer, loader, schedule = accelerator.prepare(student, optimizer, loader, schedule)
    model.train()
    with Clock() as clock:
        for ids in loader:
            step(accelerator, model, teacher, ids, optimizer, schedule, s.clip)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return clock


def step(accelerator, model, teacher, ids, optimizer, schedule, clip: float) -> None:
    """One optimizer step of the bare loop: ids (B, L)."""
    with torch.no_grad():
        target = teacher(input_ids=ids).logits
    logits = model(input_ids=ids).logits
    kl = F.kl_div(F.log_softmax(logits.flatten(0, 1), -1), F.log_softmax(target.flatten(0, 1), -1),
                  log_target=True, reduction="batchmean")
    loss = kl + F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    accelerator.backward(loss)
    accelerator.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    schedule.step()
    optimizer.zero_grad()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dense, moe = models()
    clocks: dict[str, list[Clock]] = {"moeify": [], "bare": []}
    for run in range(args.runs):
        # Alternate which loop goes first, so neither always inherits the other's freed memory.
        for name in ("moeify", "bare") if run % 2 == 0 else ("bare", "moeify"):
            clocks[name].append((moeify_run if name == "moeify" else bare_run)(dense, moe, args.steps))
        print(f"run {run + 1}: " + ", ".join(f"{name} {c[-1].wall:.2f} s wall {c[-1].cpu:.2f} s cpu"
                                              for name, c in clocks.items()), flush=True)
    tokens = args.steps * BATCH * SEQ_LEN
    print(f"{args.steps} steps x {BATCH * SEQ_LEN} tokens, {args.threads} thread(s), median of {args.runs}:")
    for kind in ("cpu", "wall"):
        ours, bare = (statistics.median(getattr(c, kind) for c in clocks[name]) for name in ("moeify", "bare"))
        print(f"  {kind:4}: moeify {ours:.2f} s ({tokens / ours:.0f} tok/s), bare accelerate {bare:.2f} s "
              f"({tokens / bare:.0f} tok/s): overhead {100 * (ours / bare - 1):+.1f} %")


if __name__ == "__main__":
    main()
