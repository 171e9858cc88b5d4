"""Calibration text and streaming statistics of FFN neurons on it.

A split groups neurons that fire together, carves shared experts from neurons that fire
often, and fits routers that predict which group matters for a token. All of it needs the
FFN inputs of real text, so calibration runs the dense model over it one decoder layer at a
time (moeify.layerwise), never holding the whole model. Only running sums are kept for the
layer being read, never the activations themselves: memory is bounded by one layer's shapes
and the tokens' hidden states. Without a text of the user's, a small mixed corpus shipped in
the package is read (moeify/data/calibration): sampling text needs the whole model at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import resources
from itertools import zip_longest
from pathlib import Path
from typing import Any

import torch

from moeify import documents
from moeify.adapters import Adapter
from moeify.checkpoint import Checkpoint
from moeify.errors import MoeifyError
from moeify.text import MAX_BYTES, read_jsonl, read_plain
from moeify.transforms import FFN

SEQUENCE = 512  # tokens per calibration sequence
BATCH = 1  # sequences per forward pass: one layer is read once whatever the batch; attention temporaries grow with it
UPDATE_TOKENS = 512  # tokens per statistics update: bounds the (T, I) temporaries
TOP_UP = 128  # a text this many tokens short of the budget is topped up with the built-in corpus
BUILTIN = ("prose", "dialogue", "code")  # moeify/data/calibration/*.txt, read in turn
PASSAGE = 2000  # characters of each built-in part before the next part's turn
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
    keep_inputs: bool = False  # keep X itself: a refit (moeify.refit) needs it once the pieces are chosen
    tokens: int = 0
    mass: torch.Tensor = field(init=False)  # (I,) sum of C
    hot: torch.Tensor = field(init=False)  # (I,) tokens on which the neuron is strongly active
    xx: torch.Tensor = field(init=False)  # (H, H) X^T X
    xs: torch.Tensor = field(init=False)  # (H, I) X^T S, S = C / C.sum(1): least-squares routers, any grouping
    cc: torch.Tensor | None = field(init=False)  # (I, I) C^T C
    inputs: list[torch.Tensor] | None = field(init=False)  # the (T, H) float32 inputs, when keep_inputs

    def __post_init__(self) -> None:
        H, I = self.hidden, self.intermediate
        self.mass, self.hot = torch.zeros(I, dtype=torch.float64), torch.zeros(I, dtype=torch.float64)
        self.xx, self.xs = torch.zeros(H, H, dtype=torch.float64), torch.zeros(H, I, dtype=torch.float64)
        self.cc = torch.zeros(I, I) if self.coactivation else None
        self.inputs = [] if self.keep_inputs else None

    @staticmethod
    def nbytes(hidden: int, intermediate: int, coactivation: bool) -> int:
        return 8 * (hidden * hidden + hidden * intermediate + 2 * intermediate) + 4 * intermediate**2 * coactivation

    def update(self, x: torch.Tensor, c: torch.Tensor) -> None:
        """Add tokens: x (T, H) FFN inputs, c (T, I) their neuron contributions."""
        self.tokens += len(x)
        if self.inputs is not None:
            self.inputs.append(x.clone())
        self.mass += c.sum(0).double()
        top = c.topk(max(1, int(HOT_SHARE * self.intermediate)), dim=1).indices
        self.hot += torch.bincount(top.reshape(-1), minlength=self.intermediate).double()
        xd, shares = x.double(), c.double()
        shares /= shares.sum(1, keepdim=True).clamp_min(1e-12)
        self.xx.addmm_(xd.T, xd)  # in place: no (H, I) or (I, I) temporary beside the sums
        self.xs.addmm_(xd.T, shares)
        if self.cc is not None:
            self.cc.addmm_(c.T, c)

    def coactivation_features(self, neurons: torch.Tensor, rows: int = 512) -> torch.Tensor:
        """(N, N) float32 cosine similarity of the neurons' contributions over tokens: a row per neuron.

        Divided in float64 `rows` rows at a time, then rounded: a whole float64 copy is 250 MB at N = 5632.
        """
        assert self.cc is not None, "co-activation was not collected"
        every = len(neurons) == self.intermediate and torch.equal(neurons, torch.arange(self.intermediate))
        norms = (self.cc.diagonal() if every else self.cc.diagonal()[neurons]).double().clamp_min(1e-12).sqrt()
        features = torch.empty(len(neurons), len(neurons))
        for start in range(0, len(neurons), rows):
            block = slice(start, start + rows)
            sub = self.cc[block] if every else self.cc[neurons[block]][:, neurons]
            features[block] = sub.double().div_(norms[block, None]).div_(norms[None, :])
        return features


# ---------------------------------------------------------------------------- text


def read_texts(name: str, tokens: int | None = None) -> list[str]:
    """The texts of a calibration file (plain text, or JSONL with a "text" field), or of whatever else
    training reads (moeify.documents: a Parquet or Arrow file, a dataset folder, a Hub dataset).

    tokens: the budget; only the text it can use is read (16 characters a token, ~4 times what
    English needs). None reads up to moeify.text.MAX_BYTES.
    """
    chars = None if tokens is None else 16 * tokens
    path = Path(name).expanduser()
    if path.is_file() and path.suffix.lower() not in documents.TABLES:
        return _file_texts(path, chars)
    return _document_texts(name, chars or MAX_BYTES)


def check_text(name: str, tokens: int) -> None:
    """What can be checked before anything is loaded. A file is read to its budget, so that a missing,
    empty or malformed one fails now; a stream (a dataset folder, a Hub dataset) is checked for its
    kind alone and read once, by the calibration pass: reading it here too would fetch it twice."""
    if Path(name).expanduser().is_file():
        read_texts(name, tokens)
    else:
        documents.check_data(name, "--calibration")


def _file_texts(path: Path, chars: int | None) -> list[str]:
    if path.suffix == ".jsonl":
        texts = read_jsonl(path, "--calibration", chars)
    else:
        texts = [read_plain(path, "--calibration", chars)]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise MoeifyError(f"calibration file {path} is empty; give it some text in the model's language")
    return texts


def _document_texts(name: str, chars: int) -> list[str]:
    """Documents until `chars` characters: a stream is read no further (no tokenizer here, so chat
    rows are refused: calibration wants plain "text")."""
    texts, left = [], chars
    for text in documents.documents(name, None, "--calibration"):
        texts.append(text[:left])
        left -= len(texts[-1])
        if left <= 0:
            break
    return texts


def builtin_texts(tokens: int | None = None) -> list[str]:
    """moeify's own calibration corpus (moeify/data/calibration): prose, dialogue and code passages in turn.

    Interleaved so that any prefix mixes the three; tokens bounds the characters read as read_texts does.
    """
    parts = [resources.files("moeify").joinpath(f"data/calibration/{name}.txt").read_text(encoding="utf-8")
             for name in BUILTIN]
    passages = [_passages(part) for part in parts]
    mixed = [p for turn in zip_longest(*passages) for p in turn if p is not None]
    chars = 16 * tokens if tokens is not None else None
    texts, got = [], 0
    for passage in mixed:
        if chars is not None and got >= chars:
            break
        texts.append(passage)
        got += len(passage)
    return texts


def _passages(text: str) -> list[str]:
    """Consecutive paragraphs grouped into passages of about PASSAGE characters."""
    passages, current = [], ""
    for paragraph in text.split("\n\n"):
        current = f"{current}\n\n{paragraph}" if current else paragraph
        if len(current) >= PASSAGE:
            passages.append(current)
            current = ""
    return passages + ([current] if current.strip() else [])


def token_ids(tokenizer, texts: list[str], budget: int) -> torch.Tensor:
    """Texts tokenised end to end (joined by the end-of-text token), at most `budget` ids: (N,)."""
    if not texts:
        return torch.zeros(0, dtype=torch.long)
    sep = tokenizer.eos_token or "\n\n"
    return torch.tensor(tokenizer(sep.join(texts))["input_ids"][:budget], dtype=torch.long)


def token_batches(tokenizer, texts: list[str], budget: int) -> list[torch.Tensor]:
    """Texts tokenised end to end and cut into batches of (B, SEQUENCE) ids, at most `budget` tokens."""
    return _batches(token_ids(tokenizer, texts, budget))


def _batches(ids: torch.Tensor, sequence: int = SEQUENCE) -> list[torch.Tensor]:
    if len(ids) < 16:
        raise MoeifyError(f"calibration text has only {len(ids)} tokens; give at least a paragraph")
    full = len(ids) // sequence * sequence
    batches = list(ids[:full].reshape(-1, sequence).split(BATCH)) if full else []
    return batches + ([ids[full:][None]] if full < len(ids) else [])  # the rest as one shorter sequence


def calibration_batches(tokenizer, text: str | None, budget: int, notify: Callable[[str], None],
                        sequence: int = SEQUENCE) -> list[torch.Tensor]:
    """The batches (B, sequence) calibration reads: the user's text, topped up with the built-in corpus when short.

    A short text is topped up because routers are fitted in H dimensions and need many more
    tokens than that; the built-in corpus needs no model to make (sampling did: a whole model).
    """
    texts = read_texts(text, budget) if text is not None else builtin_texts(budget)
    ids = token_ids(tokenizer, texts, budget)
    missing = budget - len(ids)
    if text is not None and missing >= TOP_UP:
        notify(f"the calibration text gave {len(ids)} of {budget} tokens; "
               f"the other {missing} come from moeify's built-in corpus")
        ids = torch.cat([ids, token_ids(tokenizer, builtin_texts(missing), missing)])
    return _batches(ids, sequence)


def sequence_length(config: dict) -> int:
    """SEQUENCE, or the model's context when shorter (gpt2 names it n_positions)."""
    context = config.get("max_position_embeddings") or config.get("n_positions")
    return min(SEQUENCE, int(context)) if context else SEQUENCE


# ---------------------------------------------------------------------------- statistics


def collect(folder: Path, adapter: Adapter, layers: list[int], text: str | None, budget: int, seed: int,
            coactivation: bool, keep_inputs: bool = False,
            on_progress: Callable[[int, int], None] = lambda done, total: None,
            notify: Callable[[str], None] = lambda line: None,
            reduce: Callable[[int, LayerStats], Any] = lambda layer, stats: stats) -> dict[int, Any]:
    """Run the dense model on calibration text and return reduce(layer, statistics) of each chosen FFN.

    text: a file or datasets name (None: the built-in corpus). The model runs one decoder layer
    at a time (moeify.layerwise): each chosen layer's statistics are collected, reduced (e.g. to
    a grouping and a router) and dropped before the next layer is read, so memory is one layer,
    one layer's statistics and the tokens' hidden states, whatever the depth. Layers after the
    last chosen one are never read. on_progress(done, total) counts layers. seed is unused since
    calibration text is no longer sampled; kept so recorded specs replay. keep_inputs: the layer's
    statistics also hold its FFN inputs (tokens × H floats), for a refit once its pieces are chosen.
    """
    from moeify.layerwise import LayerwiseModel
    from moeify.loading import Code, tokenizer_in

    ckpt = Checkpoint(folder)
    # The family's own classes whatever an auto_map says: the output computes what the adapter
    # reads, so calibration runs that, and no Python of the folder is imported.
    tokenizer = tokenizer_in(folder, Code.FAMILY)
    if tokenizer is None:
        raise MoeifyError(f"calibration needs the source's tokenizer, which {folder} lacks or cannot load; "
                          f"copy its tokenizer files in")
    batches = calibration_batches(tokenizer, text, budget, notify, sequence_length(ckpt.config))
    runner = LayerwiseModel(folder, Code.FAMILY)
    act = adapter.activation_fn(ckpt.config)
    hidden = int(ckpt.config[adapter.hidden_field])
    states = runner.start(batches)
    results: dict[int, Any] = {}
    last = max(layers)
    for index in range(last + 1):
        if index in layers:
            stats = LayerStats(hidden, adapter.read_ffn(ckpt, index, meta=True).intermediate_size, coactivation,
                               keep_inputs)
            mlp = adapter.mlp_path(index)
            runner.run_layer(index, states, lambda i, layer: _recording(
                runner.model.get_submodule(mlp), stats, adapter.read_ffn(_Loaded(ckpt, runner.model), i), act))
            results[index] = reduce(index, stats)  # the layer is gone; the statistics go once reduced
            del stats
        else:
            runner.run_layer(index, states)
        on_progress(index + 1, last + 1)
    return results


@dataclass
class _Loaded:
    """The checkpoint read as float32, through the loaded layer's own parameters where the model has the
    tensor under the same name and shape: those are the same values, and a second float32 copy of a
    1.1B's FFN beside the layer is 138 MB. Anything else (renamed, fused) is read from disk."""

    ckpt: Checkpoint
    model: torch.nn.Module

    def read(self, name: str) -> torch.Tensor:
        try:
            loaded = self.model.get_parameter(name)
        except AttributeError:
            loaded = None
        if loaded is None or loaded.is_meta or loaded.dtype != torch.float32 or loaded.shape != self.ckpt.info(name).shape:
            return self.ckpt.read(name).float()
        return loaded.detach()


@contextmanager
def _recording(mlp: torch.nn.Module, stats: LayerStats, ffn: FFN, act: Callable) -> Iterator[None]:
    """Feed the FFN's inputs (and their neuron contributions) into stats while the layer runs."""
    def record(module, args):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
        for part in x.split(UPDATE_TOKENS):  # (T, I) temporaries of a few MB, not of the whole batch
            stats.update(part, contributions(ffn, act, part))

    handle = mlp.register_forward_pre_hook(record)
    try:
        yield
    finally:
        handle.remove()
