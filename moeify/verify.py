"""What a conversion cost: compare a converted model with its source on the same text.

Both models read the same token ids in chunks that fit their context, one decoder layer at a
time (moeify.layerwise): each keeps only the chunks' hidden states between layers, then the
two heads run one at a time, so memory is about one layer and one head, never two models. Expert load is counted by hooks on the MoE blocks, found by
convention: a child named `gate` (transformers' Mixtral and Qwen-MoE *TopKRouter, which returns
the chosen indices) or `router` (moeify's remote format, logits whose top-k is the choice)
beside an `experts` module.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from moeify.checkpoint import _read_config
from moeify.errors import MoeifyError
from moeify.loading import Code, code_of, tokenizer_in
from moeify.peer import RecallTally, unretrieved_params
from moeify.source import resolve

DEFAULT_TOKENS = 512
MAX_TOKENS = 2**20  # as calibration: the hidden states (tokens x hidden, float32) are 4 GiB per 1024 of width
DEFAULT_CONTEXT = 2048  # when a config states no maximum position
ROUTER_NAMES = ("gate", "router")  # last name component of a router module under a MoE block
_LAYER = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)\.")  # decoder layer lists: model.layers, transformer.h (gpt2)
# What every conversion keeps, by the config fields that state it (gpt2 names its own).
LINEAGE = {"hidden size": ("hidden_size", "n_embd"), "vocabulary size": ("vocab_size",),
           "layer count": ("num_hidden_layers", "n_layer")}
MOE_FAMILIES = {"mixtral", "qwen2_moe", "qwen3_moe"}  # native targets that hold several dense families

Notify = Callable[[str], None]


@dataclass(frozen=True)
class Routing:
    """What a MoE config says about routing."""

    experts: int  # routed experts per MoE layer
    topk: int  # routed experts chosen per token
    shared: int = 0  # always-on experts per MoE layer


@dataclass
class ModelStats:
    """One model's side of the comparison."""

    name: str
    perplexity: float
    total_params: int
    active_params: int  # total minus the routed experts a token does not use
    routing: Routing | None = None
    load: dict[int, list[float]] = field(default_factory=dict)  # MoE layer -> share of selections per expert
    retrieval: dict | None = None  # PEER layers: recall against the oracle, neurons per token (RecallTally.report)


@dataclass
class Report:
    source: ModelStats
    converted: ModelStats
    tokens: int  # tokens read; each chunk predicts all but its first
    chunks: int
    max_logit_diff: float
    mean_logit_diff: float
    top1_agreement: float  # share of positions where both models predict the same next token

    @property
    def ppl_ratio(self) -> float:
        return self.converted.perplexity / self.source.perplexity

    def to_dict(self) -> dict:
        return asdict(self) | {"ppl_ratio": self.ppl_ratio}


# ---------------------------------------------------------------------------- inputs


def load_text(path: Path | None, tokens: int | None = None) -> str:
    """The text to evaluate on: a plain-text file, or the built-in English passage.

    tokens: how many will be read; only the prefix token_ids can use (64 characters a token) is
    read. None reads up to moeify.text.MAX_BYTES. Binary files are refused.
    """
    from moeify.text import read_plain

    if path is None:
        return resources.files("moeify").joinpath("data/verify_text.txt").read_text(encoding="utf-8")
    path = Path(path)
    if not path.is_file():
        raise MoeifyError(f"text file {path} does not exist; pass a plain-text file to --text")
    text = read_plain(path, "--text", None if tokens is None else tokens * 64)
    if not text.strip():
        raise MoeifyError(f"text file {path} is empty; pass a file with some prose in it")
    return text


def read_config(folder: Path) -> dict:
    """config.json, with the fields of a wrapped base config (moeify's remote format) at the top level."""
    config = _read_config(Path(folder))
    inner = config.get("base_config") or config.get("text_config")
    return {**inner, **config} if isinstance(inner, dict) else config


def check_lineage(source: dict, converted: dict) -> None:
    """Refuse a pair that cannot be a model and its conversion: the shapes every conversion keeps differ.

    Conversions keep the hidden size, the vocabulary and the layer count; the family stays too,
    except that a native MoE format (Mixtral, Qwen-MoE) holds several dense families.
    """
    for label, names in LINEAGE.items():
        a, b = (next((c[n] for n in names if c.get(n) is not None), None) for c in (source, converted))
        if a is not None and b is not None and a != b:
            raise MoeifyError(f"the converted model is not a conversion of the source: its {label} is {b}, "
                              f"the source's {a}; pass SOURCE first, then the model converted from it")
    a, b = family(source), family(converted)
    if a != b and not {a, b} & MOE_FAMILIES:
        raise MoeifyError(f"the converted model is not a conversion of the source: it is a {b} model, "
                          f"the source a {a}; pass SOURCE first, then the model converted from it")


def family(config: dict) -> str | None:
    """The model type, of the wrapped base model for moeify's remote format."""
    base = config.get("base_config")
    return base.get("model_type") if isinstance(base, dict) else config.get("model_type")


def routing_of(config: dict) -> Routing | None:
    """Expert counts from a config (Mixtral, Qwen2/3-MoE, moeify remote), None for a dense model."""
    moe = config.get("moe")
    if isinstance(moe, dict):  # moeify's remote format
        if not moe.get("moe_layers"):  # PEER layers only (see peer_blocks): no router
            return None
        return Routing(int(moe["num_experts"]), int(moe["num_experts_per_tok"]), int(moe.get("num_shared_experts", 0)))
    experts = config.get("num_local_experts") or config.get("num_experts")  # Mixtral | Qwen-MoE
    if not experts or experts < 2 or not config.get("num_experts_per_tok"):
        return None
    shared = 1 if config.get("shared_expert_intermediate_size") else 0  # Qwen2-MoE's one shared expert
    return Routing(int(experts), int(config["num_experts_per_tok"]), shared)


def token_ids(text: str, tokenizer, tokens: int) -> torch.Tensor:
    """The first `tokens` ids of the text: (N,)."""
    text = text[: tokens * 64]  # tokens average far under 64 characters: a long file is not tokenized whole
    ids = torch.tensor(tokenizer(text)["input_ids"][:tokens], dtype=torch.long)
    if ids.numel() < 2:
        raise MoeifyError(f"the text gives {ids.numel()} token(s); verify needs at least 2, pass a longer --text")
    return ids


def shared_ids(text: str, tokens: int, source_dir: Path, converted_dir: Path,
               configs: tuple[dict, dict], codes: tuple[Code | None, Code | None] = (None, None)) -> torch.Tensor:
    """The ids both models read: (N,). Refuses pairs whose logits cannot be compared."""
    a, b = (c.get("vocab_size") for c in configs)
    if a != b:
        raise MoeifyError(f"vocab sizes differ (source {a}, converted {b}); verify needs models that share a tokenizer")
    mine, theirs = tokenizer_in(source_dir, codes[0]), tokenizer_in(converted_dir, codes[1])
    if mine is None and theirs is None:
        raise MoeifyError(f"neither {source_dir} nor {converted_dir} has a tokenizer; copy the tokenizer files in")
    # Same vocabulary, not same splitting: transformers may rebuild a generic tokenizer's
    # pre-tokenizer from the model type (qwen2 vs qwen2_moe), yet the ids mean the same to both.
    if mine is not None and theirs is not None and mine.get_vocab() != theirs.get_vocab():
        raise MoeifyError("source and converted tokenizers have different vocabularies; compare models that share one")
    ids = token_ids(text, mine or theirs, tokens)
    if a is not None and int(ids.max()) >= a:
        raise MoeifyError(f"the tokenizer gives id {int(ids.max())} but the models have {a} embeddings; "
                          f"use the tokenizer that belongs to the models")
    return ids


def context_of(*configs: dict) -> int:
    sizes = [c.get("max_position_embeddings") or c.get("n_positions") or DEFAULT_CONTEXT for c in configs]  # gpt2
    return int(min(sizes))


def chunked(ids: torch.Tensor, context: int) -> list[torch.Tensor]:
    """Consecutive chunks of at most `context` ids; a last chunk of one id predicts nothing and is dropped."""
    return [c for c in torch.split(ids, context) if c.numel() > 1]


# ---------------------------------------------------------------------------- models


@dataclass(frozen=True)
class Block:
    """One MoE layer of a loaded model: the block, its router and its routed experts."""

    module: nn.Module
    router: nn.Module
    experts: nn.Module


def blocks(model: nn.Module) -> dict[int, Block]:
    """MoE blocks by layer index: a `gate` or `router` child of a module that holds `experts`."""
    found = {}
    for name, module in model.named_modules():
        parent_name, _, leaf = name.rpartition(".")
        layer = _LAYER.search(name)
        if leaf not in ROUTER_NAMES or not layer:
            continue
        parent = model.get_submodule(parent_name)
        if isinstance(getattr(parent, "experts", None), nn.Module):
            found[int(layer.group(1))] = Block(parent, module, parent.experts)
    return dict(sorted(found.items()))


def peer_blocks(model: nn.Module) -> dict[int, nn.Module]:
    """PEER blocks by layer index (the remote code's PeerBlock, from whichever copy of the code loaded it)."""
    found = {}
    for name, module in model.named_modules():
        layer = _LAYER.search(name + ".")
        if type(module).__name__ == "PeerBlock" and layer:
            found[int(layer.group(1))] = module
    return found


def param_counts(model: nn.Module, routing: Routing | None, found: dict[int, Block]) -> tuple[int, int]:
    """(total, active per token): active leaves out the routed experts a token does not use."""
    total = sum(p.numel() for p in model.parameters())  # parameters() counts tied weights once
    if routing is None:
        return total, total
    unused = 0
    for block in found.values():
        per_expert = sum(p.numel() for p in block.experts.parameters()) // routing.experts
        unused += (routing.experts - routing.topk) * per_expert
    return total, total - unused


@contextmanager
def counting(found: dict[int, Block], routing: Routing) -> Iterator[dict[int, torch.Tensor]]:
    """Count top-k selections per expert of every MoE block while the model runs: {layer: (E,) counts}.

    The hook sits on the block, not on the router: the remote block computes its logits from
    router.weight without calling the router's forward, so a hook on the router would never fire.
    The block's input is routed once more here, which in eval mode repeats the block's choice.
    """
    counts = {layer: torch.zeros(routing.experts, dtype=torch.long) for layer in found}

    def hook(layer: int, router: nn.Module):
        def record(module, args, kwargs):
            hidden = args[0] if args else next(iter(kwargs.values()))
            chosen = choice(router, hidden, routing.topk)
            counts[layer] += torch.bincount(chosen.reshape(-1), minlength=routing.experts)
        return record

    handles = [block.module.register_forward_pre_hook(hook(layer, block.router), with_kwargs=True)
               for layer, block in found.items()]
    try:
        yield counts
    finally:
        for handle in handles:
            handle.remove()


def choice(router: nn.Module, hidden: torch.Tensor, topk: int) -> torch.Tensor:
    """The experts a router picks for hidden (..., H): (tokens, k).

    transformers' TopKRouters return (logits, scores, indices). A plain router returns logits
    (..., E): the choice is the top-k of the softmax, plus the aux-loss-free balancing bias
    (`expert_bias`, selection only) where the router has one.
    """
    output = router.forward(hidden)  # not __call__: other hooks (transformers' output recorders) must not see it
    if isinstance(output, tuple):
        indices = [t for t in output if torch.is_tensor(t) and not t.is_floating_point()]
        if indices:
            return indices[0]
        output = output[0]
    scores = output.reshape(-1, output.shape[-1]).float().softmax(dim=-1)
    bias = getattr(router, "expert_bias", None)
    if bias is not None:
        scores = scores + bias.float()
    return scores.topk(topk, dim=-1).indices


def shares(counts: dict[int, torch.Tensor]) -> dict[int, list[float]]:
    """Counts as each expert's share of its layer's selections (each layer sums to 1)."""
    return {layer: (c.double() / max(int(c.sum()), 1)).tolist() for layer, c in counts.items()}


# ---------------------------------------------------------------------------- evaluation


class _Side:
    """One model of the comparison, run one decoder layer at a time (moeify.layerwise)."""

    def __init__(self, folder: Path, name: str, code: Code | None):
        from moeify.layerwise import LayerwiseModel

        self.name = name
        self.runner = LayerwiseModel(folder, code)
        self.routing = routing_of(self.runner.config.to_dict())
        found = blocks(self.runner.model) if self.routing else {}
        if self.routing and not found:
            raise MoeifyError(f"{name}'s config describes experts but verify found no router module in it; "
                              f"it knows Mixtral, Qwen-MoE and moeify's remote format")
        self.params = param_counts(self.runner.model, self.routing, found)  # counted on the meta device
        self.peer = peer_blocks(self.runner.model)
        if self.peer:
            total, active = self.params
            self.params = total, active - sum(unretrieved_params(block) for block in self.peer.values())
        self.recall = RecallTally()
        self.moe_layers = set(found)
        self.counts: dict[int, torch.Tensor] = {}

    def run(self, chunks: list[torch.Tensor]) -> list:
        """Every chunk's hidden states through every layer, counting router selections on the way."""
        states = self.runner.start([chunk[None] for chunk in chunks])
        self.runner.run(states, hooks=self._counting)
        return states

    @contextmanager
    def _counting(self, index: int, layer: nn.Module) -> Iterator[None]:
        if index in self.peer:
            with self._recalling(index):
                yield
            return
        block = blocks(self.runner.model).get(index) if index in self.moe_layers else None
        if block is None:
            yield
            return
        with counting({index: block}, self.routing) as counts:
            yield
        self.counts |= counts

    @contextmanager
    def _recalling(self, index: int) -> Iterator[None]:
        """Score the PEER block's retrieval against the oracle on every input it sees."""
        def record(module, args, kwargs):
            self.recall.add(index, module, args[0] if args else next(iter(kwargs.values())))

        handle = peer_blocks(self.runner.model)[index].register_forward_pre_hook(record, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    def stats(self, nll: float, predicted: int) -> ModelStats:
        total, active = self.params
        retrieval = self.recall.report(next(iter(self.peer.values()))) if self.peer else None
        return ModelStats(self.name, math.exp(nll / predicted), total, active, self.routing, shares(self.counts),
                          retrieval)


@dataclass
class _Tally:
    """Running sums over the chunks: each model's NLL, and the logit differences between them."""

    nll: list[float] = field(default_factory=lambda: [0.0, 0.0])  # source, converted
    predicted: int = 0  # next tokens predicted
    max: float = 0.0
    abs_sum: float = 0.0
    values: int = 0
    agree: int = 0  # positions where both models predict the same next token
    positions: int = 0

    def add(self, chunk: torch.Tensor, ref: torch.Tensor, logits: torch.Tensor) -> None:
        """chunk (T,) ids; ref and logits (T, V) float32: the source's and the converted model's."""
        for i, out in enumerate((ref, logits)):
            self.nll[i] += nn.functional.cross_entropy(out[:-1], chunk[1:], reduction="sum").item()
        self.predicted += chunk.numel() - 1
        diff = (logits - ref).abs()
        self.max = max(self.max, diff.max().item())
        self.abs_sum += diff.double().sum().item()
        self.values += diff.numel()
        self.agree += int((logits.argmax(-1) == ref.argmax(-1)).sum())
        self.positions += len(logits)


def compare(sides: tuple[_Side, _Side], chunks: list[torch.Tensor]) -> tuple[_Tally, ModelStats, ModelStats]:
    """Both models over the chunks (two hidden-state caches), then each chunk through one head, then the other.

    One head at a time: a model's embeddings and head are its largest tensors (two 1.1B heads
    held together were 1.6 GB in float32); they are re-read per chunk, and chunks are few.
    """
    states = [side.run(chunks) for side in sides]
    tally = _Tally()
    for chunk, a, b in zip(chunks, *states):
        with sides[0].runner.head() as before:
            reference = before(a)[0]
        with sides[1].runner.head() as after:
            tally.add(chunk, reference, after(b)[0])
    return tally, *(side.stats(nll, tally.predicted) for side, nll in zip(sides, tally.nll))


def verify(source: str, converted: str, text: str, tokens: int = DEFAULT_TOKENS,
           notify: Notify = lambda line: None, trust_remote_code: bool = False) -> Report:
    """Compare CONVERTED with SOURCE on the first `tokens` tokens of `text`.

    A folder's own Python runs only with trust_remote_code; without it such a folder is refused
    before anything is loaded (moeify's own remote outputs excepted, see moeify.loading).
    """
    if not 2 <= tokens <= MAX_TOKENS:
        raise MoeifyError(f"--tokens must be between 2 and {MAX_TOKENS} (got {tokens}): every token's hidden "
                          f"states are held at once")
    source_dir, converted_dir = resolve(source, notify), resolve(converted, notify)
    codes = code_of(source_dir, trust_remote_code), code_of(converted_dir, trust_remote_code)
    configs = read_config(source_dir), read_config(converted_dir)
    check_lineage(*configs)
    ids = shared_ids(text, tokens, source_dir, converted_dir, configs, codes)
    if ids.numel() < tokens:
        notify(f"the text gives {ids.numel()} tokens, fewer than --tokens {tokens}: verifying on {ids.numel()}")
    chunks = chunked(ids, context_of(*configs))
    sides = _Side(source_dir, source, codes[0]), _Side(converted_dir, converted, codes[1])
    notify(f"running {source} and {converted} on {ids.numel()} tokens, one layer at a time")
    tally, before, after = compare(sides, chunks)
    return Report(before, after, tokens=ids.numel(), chunks=len(chunks), max_logit_diff=tally.max,
                  mean_logit_diff=tally.abs_sum / tally.values, top1_agreement=tally.agree / tally.positions)


# ---------------------------------------------------------------------------- plot


def plot(report: Report, path: Path) -> Path:
    """A PNG heatmap (MoE layers x experts) of each MoE model's expert load."""
    models = [m for m in (report.source, report.converted) if m.load]
    if not models:
        raise MoeifyError("neither model has routed experts, so there is no expert load to plot; drop --plot")
    import matplotlib  # moeify.plotting.plot_file said so in one line if it is missing

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    rows = max(len(m.load) for m in models)
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), min(3 + 0.12 * rows, 16)), squeeze=False)
    for ax, stats in zip(axes[0], models):
        layers = list(stats.load)
        image = ax.imshow([stats.load[i] for i in layers], aspect="auto", cmap="viridis", vmin=0)
        ax.set(title=f"{Path(stats.name).name}: expert load", xlabel="expert", ylabel="layer")
        step = math.ceil(len(layers) / 24)  # at most ~24 labels stay readable
        ax.set_yticks(range(0, len(layers), step), [str(i) for i in layers[::step]])
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        fig.colorbar(image, ax=ax, label="share of selections")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
