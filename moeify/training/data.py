"""Training text: read once, tokenised once, packed into equal sequences, served in a fixed order.

The order of every sequence the run will see is a pure function of the seed (one permutation
per pass over the data), so a resumed run skips the batches it already trained on and sees
exactly what an uninterrupted run would have seen next, on any number of processes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from moeify.errors import MoeifyError
from moeify.documents import check_data, documents, is_stream

EVAL_TOKENS = 65_536  # held-out tokens read from a stream given as --eval-text (at least 8 sequences)


@dataclass(frozen=True)
class Corpus:
    """Packed token ids: train (S, L) and held_out (E, L), L = seq_len."""

    train: torch.Tensor
    held_out: torch.Tensor


def check_sources(settings, recipe: bool = False) -> None:
    """The data and held-out text are of kinds moeify reads, and a stream comes with the run's length:
    checked before anything long (a recipe's before its conversion, naming its train.* fields)."""
    def option(field: str) -> str:
        return f"train.{field}" if recipe else "--" + field.replace("_", "-")

    check_data(settings.data, option("data"))
    if settings.eval_text is not None:
        check_data(settings.eval_text, option("eval_text"))
    if settings.steps is None and settings.max_tokens is None and is_stream(settings.data):
        raise MoeifyError(f"{option('data')} {settings.data} is a dataset read as a stream, so moeify reads only what "
                          f"the run needs: give {option('steps')} or {option('max_tokens')}")


def token_ids(texts: Iterable[str], tokenizer, limit: int | None = None) -> torch.Tensor:
    """Every document's ids, each followed by the end-of-text token: (N,); with limit, documents are
    read only until that many ids are gathered (the last one cut)."""
    end = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids: list[int] = []
    for document in texts:
        ids += tokenizer(document, add_special_tokens=False, verbose=False)["input_ids"] + end
        if limit is not None and len(ids) >= limit:
            del ids[limit:]
            break
    return torch.tensor(ids, dtype=torch.long)


def pack(ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Consecutive ids cut into full sequences: (N,) -> (N // seq_len, seq_len); the rest is dropped."""
    full = ids.numel() // seq_len
    return ids[: full * seq_len].reshape(full, seq_len)


def corpus(data: str, eval_text: str | None, eval_fraction: float, seq_len: int, tokenizer,
           train_tokens: int | None = None) -> Corpus:
    """Training and held-out sequences; refuses data too short for one of each.

    train_tokens: how many tokens the run trains on, read from a stream (a folder, a Hub dataset) and
    not beyond; a file is read whole.
    """
    wanted = None
    if train_tokens is not None:  # whole sequences, enough that the held-out share leaves train_tokens
        held_share = 0.0 if eval_text is not None else eval_fraction
        wanted = math.ceil(math.ceil(train_tokens / seq_len) / (1 - held_share)) * seq_len
    sequences = _packed(data, "--data", seq_len, tokenizer, wanted)
    if eval_text is not None:
        return Corpus(sequences, _packed(eval_text, "--eval-text", seq_len, tokenizer, max(EVAL_TOKENS, 8 * seq_len)))
    held = math.ceil(eval_fraction * len(sequences))
    if held and len(sequences) - held < 1:
        raise MoeifyError(f"--data gives {len(sequences)} sequence(s) of {seq_len} tokens, too few to hold "
                          f"{eval_fraction:.0%} out; give more text, a smaller --seq-len, or --eval-text")
    return Corpus(sequences[: len(sequences) - held], sequences[len(sequences) - held:])


def _packed(path: str, what: str, seq_len: int, tokenizer, stream_tokens: int | None) -> torch.Tensor:
    """The data's sequences; a stream is read to stream_tokens tokens (check_sources saw that it has them)."""
    ids = token_ids(documents(path, tokenizer, what), tokenizer, stream_tokens if is_stream(path) else None)
    sequences = pack(ids, seq_len)
    if len(sequences) == 0:
        raise MoeifyError(f"{what} {path} gives {ids.numel()} tokens, fewer than one --seq-len sequence "
                          f"({seq_len}); give more text or a smaller --seq-len")
    return sequences


def order(sequences: int, count: int, seed: int) -> torch.Tensor:
    """The first `count` sequence indices of the run: one seeded permutation per pass, (count,)."""
    generator = torch.Generator().manual_seed(seed)
    passes = math.ceil(count / sequences)
    return torch.cat([torch.randperm(sequences, generator=generator) for _ in range(passes)])[:count]


class Stream(Dataset):
    """The run's sequences in training order: item i is sequences[order[i]], (L,)."""

    def __init__(self, sequences: torch.Tensor, order: torch.Tensor):
        self.sequences, self.order = sequences, order

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.sequences[self.order[i]]
