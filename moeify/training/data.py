"""Training text: read once, tokenised once, packed into equal sequences, served in a fixed order.

The order of every sequence the run will see is a pure function of the seed (one permutation
per pass over the data), so a resumed run skips the batches it already trained on and sees
exactly what an uninterrupted run would have seen next, on any number of processes.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from moeify.errors import MoeifyError
from moeify.text import read_whole

SUFFIXES = (".txt", ".jsonl")


@dataclass(frozen=True)
class Corpus:
    """Packed token ids: train (S, L) and held_out (E, L), L = seq_len."""

    train: torch.Tensor
    held_out: torch.Tensor


def check_file(path: str, what: str = "--data") -> Path:
    """A .txt or .jsonl file that exists: checked before anything long runs."""
    file = Path(path).expanduser()
    if file.suffix not in SUFFIXES:
        raise MoeifyError(f"{what} {path} is not a .txt or .jsonl file; convert it to one of those")
    if not file.exists():
        raise MoeifyError(f"{what} {file} does not exist; check the path")
    if not file.is_file():
        raise MoeifyError(f"{what} {file} is not a file; pass a .txt or .jsonl file")
    return file


def read_documents(path: str, tokenizer, what: str = "--data") -> list[str]:
    """The documents of a .txt (the whole file) or .jsonl file ("text", or "messages" for chat)."""
    file = check_file(path, what)
    try:
        raw = read_whole(file, what)
    except OSError as e:
        raise MoeifyError(f"{what} {file} cannot be read ({e.strerror}); check its permissions") from None
    documents = _jsonl(file, raw, tokenizer) if file.suffix == ".jsonl" else [raw]
    documents = [d for d in documents if d.strip()]
    if not documents:
        raise MoeifyError(f"{what} {file} is empty; give it some text in the model's language")
    return documents


def _jsonl(file: Path, raw: str, tokenizer) -> list[str]:
    documents = []
    for number, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            raise MoeifyError(f"{file} line {number} is not JSON (or nests too deeply); each line must be one "
                              f"JSON object") from None
        documents.append(_document(row, file, number, tokenizer))
    return documents


def _document(row: object, file: Path, number: int, tokenizer) -> str:
    """One JSONL row as text: its "text", or its "messages" through the model's chat template."""
    if isinstance(row, dict) and isinstance(row.get("text"), str):
        return row["text"]
    if not (isinstance(row, dict) and isinstance(row.get("messages"), list)):
        raise MoeifyError(f"{file} line {number} has neither a \"text\" string nor a \"messages\" list")
    if not getattr(tokenizer, "chat_template", None):
        raise MoeifyError(f"{file} line {number} holds chat messages, but the model's tokenizer has no chat "
                          f"template; give plain \"text\" rows instead")
    try:
        return tokenizer.apply_chat_template(row["messages"], tokenize=False)
    except Exception as e:  # a malformed conversation: the template raises its own errors
        raise MoeifyError(f"{file} line {number}: the chat template rejects these messages ({e})") from None


def token_ids(documents: list[str], tokenizer) -> torch.Tensor:
    """Every document's ids, each followed by the end-of-text token: (N,)."""
    end = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids: list[int] = []
    for document in documents:
        ids += tokenizer(document, add_special_tokens=False, verbose=False)["input_ids"] + end
    return torch.tensor(ids, dtype=torch.long)


def pack(ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Consecutive ids cut into full sequences: (N,) -> (N // seq_len, seq_len); the rest is dropped."""
    full = ids.numel() // seq_len
    return ids[: full * seq_len].reshape(full, seq_len)


def corpus(data: str, eval_text: str | None, eval_fraction: float, seq_len: int, tokenizer) -> Corpus:
    """Training and held-out sequences; refuses data too short for one of each."""
    sequences = _packed(data, "--data", seq_len, tokenizer)
    if eval_text is not None:
        return Corpus(sequences, _packed(eval_text, "--eval-text", seq_len, tokenizer))
    held = math.ceil(eval_fraction * len(sequences))
    if held and len(sequences) - held < 1:
        raise MoeifyError(f"--data gives {len(sequences)} sequence(s) of {seq_len} tokens, too few to hold "
                          f"{eval_fraction:.0%} out; give more text, a smaller --seq-len, or --eval-text")
    return Corpus(sequences[: len(sequences) - held], sequences[len(sequences) - held:])


def _packed(path: str, what: str, seq_len: int, tokenizer) -> torch.Tensor:
    ids = token_ids(read_documents(path, tokenizer, what), tokenizer)
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
