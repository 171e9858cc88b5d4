"""Calibration text and streaming statistics of FFN neurons on it.

A split groups neurons that fire together, carves shared experts from neurons that fire
often, and fits routers that predict which group matters for a token. All of it needs the
FFN inputs of real text, so calibration runs the dense model once, in memory (the one place
moeify holds a model; the conversion pass that writes the output still streams). Only running
sums are kept per layer, never the activations themselves: memory is bounded by the model's
shapes, whatever the token budget.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moeify.adapters import Adapter
from moeify.checkpoint import Checkpoint
from moeify.errors import MoeifyError
from moeify.text import MAX_BYTES, read_jsonl, read_plain
from moeify.transforms import FFN

SEQUENCE = 512  # tokens per calibration sequence
BATCH = 4  # sequences per forward pass
SAMPLE_LENGTH = 128  # tokens per sequence sampled from the model when no text is given
STATS_BUDGET = 2 * 2**30  # bytes of statistics held at once; more layers take more passes over the text
HOT_SHARE = 0.1  # a neuron is "strongly active" on a token when it is in that token's top 10%


def neuron_activations(ffn: FFN, act: Callable, x: torch.Tensor) -> torch.Tensor:
    """The intermediate activations (T, I) of an FFN for inputs x (T, H), before down."""
    up = x @ ffn.up.T + (ffn.up_bias if ffn.up_bias is not None else 0)
    if ffn.gate is None:
        return act(up)
    gate = x @ ffn.gate.T + (ffn.gate_bias if ffn.gate_bias is not None else 0)
    return act(gate) * up


def contributions(ffn: FFN, act: Callable, x: torch.Tensor) -> torch.Tensor:
    """How much each neuron adds to the output, (T, I): |activation| times its down column's norm."""
    return neuron_activations(ffn, act, x).abs() * ffn.down.float().norm(dim=0)


@dataclass
class LayerStats:
    """Running sums over calibration tokens of one FFN (C: neuron contributions, X: FFN inputs)."""

    hidden: int
    intermediate: int
    coactivation: bool  # keep C^T C (I, I) as well: only the activation partition needs it
    tokens: int = 0
    mass: torch.Tensor = field(init=False)  # (I,) sum of C
    hot: torch.Tensor = field(init=False)  # (I,) tokens on which the neuron is strongly active
    xx: torch.Tensor = field(init=False)  # (H, H) X^T X
    xs: torch.Tensor = field(init=False)  # (H, I) X^T S, S = C / C.sum(1): least-squares routers, any grouping
    cc: torch.Tensor | None = field(init=False)  # (I, I) C^T C

    def __post_init__(self) -> None:
        H, I = self.hidden, self.intermediate
        self.mass, self.hot = torch.zeros(I, dtype=torch.float64), torch.zeros(I, dtype=torch.float64)
        self.xx, self.xs = torch.zeros(H, H, dtype=torch.float64), torch.zeros(H, I, dtype=torch.float64)
        self.cc = torch.zeros(I, I) if self.coactivation else None

    @staticmethod
    def nbytes(hidden: int, intermediate: int, coactivation: bool) -> int:
        return 8 * (hidden * hidden + hidden * intermediate + 2 * intermediate) + 4 * intermediate**2 * coactivation

    def update(self, x: torch.Tensor, c: torch.Tensor) -> None:
        """Add tokens: x (T, H) FFN inputs, c (T, I) their neuron contributions."""
        self.tokens += len(x)
        self.mass += c.sum(0).double()
        top = c.topk(max(1, int(HOT_SHARE * self.intermediate)), dim=1).indices
        self.hot += torch.bincount(top.reshape(-1), minlength=self.intermediate).double()
        xd = x.double()
        self.xx += xd.T @ xd
        self.xs += xd.T @ (c.double() / c.double().sum(1, keepdim=True).clamp_min(1e-12))
        if self.cc is not None:
            self.cc += c.T @ c

    def coactivation_features(self, neurons: torch.Tensor) -> torch.Tensor:
        """(N, N) cosine similarity of the neurons' contributions over tokens: a row per neuron."""
        assert self.cc is not None, "co-activation was not collected"
        sub = self.cc[neurons][:, neurons].double()
        norms = sub.diagonal().clamp_min(1e-12).sqrt()
        return sub / norms[:, None] / norms[None, :]


# ---------------------------------------------------------------------------- text


def read_texts(name: str, tokens: int | None = None) -> list[str]:
    """The texts of a calibration file (plain text, or JSONL with a "text" field), or of a datasets name.

    tokens: the budget; only the text it can use is read (16 characters a token, ~4 times what
    English needs). None reads up to moeify.text.MAX_BYTES.
    """
    chars = None if tokens is None else 16 * tokens
    path = Path(name).expanduser()
    if path.is_file():
        return _file_texts(path, chars)
    if path.suffix in (".txt", ".jsonl", ".json") or "/" not in name and "." in name:
        raise MoeifyError(f"calibration file {path} does not exist; check the path")
    return _dataset_texts(name, chars)


def _file_texts(path: Path, chars: int | None) -> list[str]:
    if path.suffix == ".jsonl":
        texts = read_jsonl(path, "--calibration", chars)
    else:
        texts = [read_plain(path, "--calibration", chars)]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise MoeifyError(f"calibration file {path} is empty; give it some text in the model's language")
    return texts


def _dataset_texts(name: str, chars: int | None) -> list[str]:
    """A Hub dataset's "text" column, as NAME or NAME:CONFIG (needs `datasets` and the network).

    At most 2000 rows, and rows only until `chars` characters (or moeify.text.MAX_BYTES) are gathered.
    """
    try:
        import datasets
    except ImportError:
        raise MoeifyError(f"calibration {name!r} is not a file, and reading it as a dataset name needs "
                          f"`pip install datasets`; pass a text or JSONL file instead") from None
    repo, _, config = name.partition(":")
    try:
        rows = datasets.load_dataset(repo, config or None, split="train", streaming=True)
        texts, left = [], chars or MAX_BYTES
        for row, _ in zip(rows, range(2000)):
            if left <= 0:
                break
            if row.get("text", "").strip():
                texts.append(row["text"][:left])
                left -= len(texts[-1])
        return texts
    except Exception as e:
        raise MoeifyError(f"cannot read dataset {name!r} ({type(e).__name__}); pass a text or JSONL file instead") from None


def token_batches(tokenizer, texts: list[str], budget: int) -> list[torch.Tensor]:
    """Texts tokenised end to end and cut into batches of (B, SEQUENCE) ids, at most `budget` tokens."""
    sep = tokenizer.eos_token or "\n\n"
    ids = torch.tensor(tokenizer(sep.join(texts))["input_ids"][:budget])
    if len(ids) < 16:
        raise MoeifyError(f"calibration text has only {len(ids)} tokens; give at least a paragraph")
    full = len(ids) // SEQUENCE * SEQUENCE
    batches = list(ids[:full].reshape(-1, SEQUENCE).split(BATCH)) if full else []
    return batches + ([ids[full:][None]] if full < len(ids) else [])  # the rest as one shorter sequence


def sampled_batches(model, tokenizer, budget: int, seed: int) -> list[torch.Tensor]:
    """Text sampled from the model itself, for calibration without any data (works offline)."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    # Short samples in a wide batch: generation time grows with length, not (much) with batch.
    length = min(SAMPLE_LENGTH, budget)
    rows = max(1, budget // length)
    with torch.random.fork_rng():  # sampling must not disturb the caller's random state
        torch.manual_seed(seed)
        out = model.generate(torch.full((rows, 1), start), do_sample=True, top_p=0.95, max_new_tokens=length,
                             min_new_tokens=length, pad_token_id=tokenizer.eos_token_id)
    return list(out[:, 1:].split(BATCH))


# ---------------------------------------------------------------------------- statistics


def collect(folder: Path, adapter: Adapter, layers: list[int], text: str | None, budget: int, seed: int,
            coactivation: bool, on_tokens: Callable[[int, int], None] = lambda done, total: None,
            notify: Callable[[str], None] = lambda line: None,
            reduce: Callable[[int, LayerStats], Any] = lambda layer, stats: stats) -> dict[int, Any]:
    """Run the dense model on calibration text and return reduce(layer, statistics) of each chosen FFN.

    text: a file or datasets name; what it lacks of the token budget (all of it without a
    text) is sampled from the model itself. Statistics are collected for as many layers at a
    time as fit in STATS_BUDGET, then reduced (e.g. to a grouping and a router) and dropped, so
    memory stays bounded for any depth and token count. on_tokens(done, total) reports progress.
    """
    from transformers.activations import ACT2FN

    from moeify.loading import Code, load_model, tokenizer_in

    ckpt = Checkpoint(folder)
    # The family's own classes whatever an auto_map says: the output computes what the adapter
    # reads, so calibration runs that, and no Python of the folder is imported.
    tokenizer = tokenizer_in(folder, Code.FAMILY)
    if tokenizer is None:
        raise MoeifyError(f"calibration needs the source's tokenizer, which {folder} lacks or cannot load; "
                          f"copy its tokenizer files in")
    texts = read_texts(text, budget) if text is not None else None
    model = load_model(folder, Code.FAMILY)
    batches = token_batches(tokenizer, texts, budget) if texts is not None else []
    missing = budget - sum(b.numel() for b in batches)
    if missing >= SAMPLE_LENGTH:  # a short text is topped up: routers are fitted in H dimensions
        notify(f"sampling {missing} calibration tokens from the model"
               + (f" (the text gave {budget - missing})" if texts is not None else ""))
        batches += sampled_batches(model, tokenizer, missing, seed)
    act = ACT2FN[adapter.activation(ckpt.config)]
    hidden = int(ckpt.config[adapter.hidden_field])
    sizes = {i: adapter.read_ffn(ckpt, i, meta=True).intermediate_size for i in layers}
    results: dict[int, Any] = {}
    chunks = _chunks(layers, lambda i: LayerStats.nbytes(hidden, sizes[i], coactivation))
    for number, chunk in enumerate(chunks):
        stats = {i: LayerStats(hidden, sizes[i], coactivation) for i in chunk}
        _run(model, batches, stats, lambda layer: adapter.read_ffn(ckpt, layer).map(lambda role, t: t.float()),
             act, adapter, lambda done, total: on_tokens(done + number * total, total * len(chunks)))
        results |= {i: reduce(i, stats.pop(i)) for i in chunk}  # statistics are dropped once reduced
    return results


def _chunks(layers: list[int], nbytes: Callable[[int], int]) -> list[list[int]]:
    """Layers in consecutive groups whose statistics fit in STATS_BUDGET (one pass over the text each)."""
    chunks: list[list[int]] = [[]]
    used = 0
    for i in layers:
        if chunks[-1] and used + nbytes(i) > STATS_BUDGET:
            chunks.append([])
            used = 0
        chunks[-1].append(i)
        used += nbytes(i)
    return chunks


def _run(model, batches: list[torch.Tensor], stats: dict[int, LayerStats], read_ffn: Callable[[int], FFN],
         act: Callable, adapter: Adapter, on_tokens: Callable[[int, int], None]) -> None:
    """One pass over the calibration batches, feeding each chosen FFN's inputs into its statistics."""
    def hook(layer: int):
        def record(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            stats[layer].update(x, contributions(read_ffn(layer), act, x))  # re-read: the model's layout varies
        return record

    handles = [model.get_submodule(adapter.mlp_path(i)).register_forward_pre_hook(hook(i)) for i in stats]
    total, done = sum(b.numel() for b in batches), 0
    try:
        with torch.no_grad():
            for batch in batches:
                model(batch)
                done += batch.numel()
                on_tokens(done, total)
    finally:
        for h in handles:
            h.remove()
