"""Several sources, one pass: a MoE whose experts are the FFNs of fine-tunes of one base.

Attention, norms and embeddings come from BASE; routed expert j's FFN from its own source model
(the same source may appear several times), shared experts' from theirs. The conversion pass is
upcycle's: the base checkpoint is read and written tensor by tensor, and `MergeReader` (the
base's Adapter) reads one layer's FFN from each source when the writer reaches that expert, so
memory holds one expert at a time whatever the number of experts.

Routed and shared outputs are each weighted 1/(S+1) as in upcycle (S shared experts), so merging
a model with copies of itself computes that model exactly; a source's `scale` multiplies its
expert's output on top (mergekit's residual_scale).
"""

from __future__ import annotations

import filecmp
import functools
import json
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from moeify.adapters import Adapter, adapter_for
from moeify.checkpoint import Checkpoint
from moeify.errors import MoeifyError
from moeify.spec import Spec
from moeify.text import read_plain
from moeify.transforms import FFN, LazyExperts, MoELayer, add_noise, check_divisible, generator, pieces
from moeify.validation import check_weights

if TYPE_CHECKING:
    from moeify.gates import Learning

PROMPT_FILE_BYTES = 2**20  # a prompt file is a few lines per expert


@dataclass(frozen=True)
class ExpertSource:
    """Where one expert's FFN comes from, and the prompts that should (positive) or should not reach it."""

    source: str
    positive: tuple[str, ...] = ()
    negative: tuple[str, ...] = ()
    scale: float = 1.0  # multiplies the expert's output (mergekit's residual_scale)

    def to_dict(self) -> dict:
        return {"source": self.source, "positive": list(self.positive), "negative": list(self.negative),
                "scale": self.scale}

    @classmethod
    def from_dict(cls, data: object, what: str) -> ExpertSource:
        """One entry of a recipe's expert_sources / shared_sources; one line naming `what` when malformed."""
        if isinstance(data, str):
            data = {"source": data}
        known = {f.name for f in fields(cls)}
        if not isinstance(data, dict) or not isinstance(data.get("source"), str) or set(data) - known:
            raise MoeifyError(f"{what} must be a mapping with source (text) and optionally positive, negative "
                              f"(lists of prompts) and scale; got {str(data)[:80]}")
        prompts = {k: _prompt_list(data.get(k), f"{what}.{k}") for k in ("positive", "negative")}
        scale = data.get("scale", 1.0)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale < float("inf"):
            raise MoeifyError(f"{what}.scale must be a positive number (got {scale!r})")
        return cls(data["source"], prompts["positive"], prompts["negative"], float(scale))


def _prompt_list(value: object, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise MoeifyError(f"{what} must be a list of prompts (text); got {str(value)[:80]}")
    return tuple(p for p in value if p.strip())


# ---------------------------------------------------------------------------- the command line


def parse_expert(text: str) -> ExpertSource:
    """--expert SOURCE[:PROMPTS]: PROMPTS is a YAML file (positive:/negative: lists), a text file (one
    positive prompt a line) or the text of one positive prompt. The first ':' separates them."""
    source, sep, prompts = text.partition(":")
    if not source.strip():
        raise MoeifyError(f"--expert {text!r} names no source; use --expert SOURCE or --expert SOURCE:PROMPTS")
    if not sep:
        return ExpertSource(source)
    positive, negative = read_prompts(prompts, f"--expert {source}")
    return ExpertSource(source, positive, negative)


def read_prompts(given: str, what: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(positive, negative) prompts from a YAML or text file, or from the given text itself."""
    path = Path(given).expanduser()
    if not path.is_file():
        if path.suffix in (".yaml", ".yml", ".txt"):
            raise MoeifyError(f"{what}: prompt file {path} does not exist; check the path")
        return (given,), ()
    if path.suffix in (".yaml", ".yml"):
        data = _yaml(path)
        if isinstance(data, list):
            data = {"positive": data}
        if not isinstance(data, dict) or set(data) - {"positive", "negative"}:
            raise MoeifyError(f"{what}: prompt file {path} must hold positive: and negative: lists of prompts")
        positive = _prompt_list(data.get("positive"), f"{path}: positive")
        negative = _prompt_list(data.get("negative"), f"{path}: negative")
    else:
        lines = read_plain(path, what, PROMPT_FILE_BYTES).splitlines()  # chars: far more than any prompt list
        positive, negative = tuple(line for line in lines if line.strip()), ()
    if not positive:
        raise MoeifyError(f"{what}: prompt file {path} has no positive prompt; give at least one")
    return positive, negative


def apply_prompt_file(experts: list[ExpertSource], path: Path) -> list[ExpertSource]:
    """--prompts FILE: a YAML mapping from an expert (its SOURCE as typed, or its index) to its prompts."""
    data = _yaml(Path(path))
    if not isinstance(data, dict) or not data:
        raise MoeifyError(f"prompt file {path} is empty or not a mapping; map each expert's SOURCE (or index) "
                          f"to positive:/negative: lists")
    out = list(experts)
    for key, prompts in data.items():
        # YAML reads `true:` as a boolean, which equals index 1: only a name or a whole number is a key
        matches = [] if isinstance(key, bool) else [j for j, e in enumerate(experts) if key in (e.source, j, str(j))]
        if not matches:
            known = ", ".join(dict.fromkeys(e.source for e in experts))
            raise MoeifyError(f"prompt file {path} names expert {key!r}, which no --expert gives; experts: {known} "
                              f"(or their index from 0)")
        if isinstance(prompts, (str, list)):
            prompts = {"positive": prompts}
        entry = ExpertSource.from_dict({"source": experts[matches[0]].source} | (prompts or {}), f"{path}: {key}")
        for j in matches:
            out[j] = replace(out[j], positive=entry.positive, negative=entry.negative)
    return out


def _yaml(path: Path):
    from moeify.recipe import _parse, _text

    return _parse(_text(path), f"prompt file {path}")


# ---------------------------------------------------------------------------- reading every source


@dataclass(frozen=True)
class LayerFFNs:
    """One layer's FFN from each source: experts[j] is read when first used, the last one kept.

    like: the first routed expert on the meta device (shapes and dtype, nothing read); meta: whether
    the experts are meta too (planning).
    """

    experts: Sequence[FFN]
    like: FFN
    meta: bool
    shared: Sequence[FFN] = field(default_factory=tuple)

    def map(self, fn: Callable[[str, torch.Tensor], torch.Tensor]) -> LayerFFNs:
        """fn applied to each FFN as it is read (never all at once)."""
        return LayerFFNs(_lazy(self.experts, lambda f: f.map(fn)), self.like.map(fn), self.meta,
                         _lazy(self.shared, lambda f: f.map(fn)))


def _lazy(items: Sequence[FFN], change: Callable[[FFN], FFN]) -> LazyExperts:
    return LazyExperts(len(items), lambda j: change(items[j]))


@dataclass(frozen=True)
class MergeReader(Adapter):
    """The base's Adapter, reading a layer's FFN from every source checkpoint instead of the base's own."""

    expert_ckpts: tuple[Checkpoint, ...] = ()
    shared_ckpts: tuple[Checkpoint, ...] = ()

    @classmethod
    def of(cls, adapter: Adapter, experts: Sequence[Checkpoint], shared: Sequence[Checkpoint]) -> MergeReader:
        own = {f.name: getattr(adapter, f.name) for f in fields(Adapter)}
        return cls(**own, expert_ckpts=tuple(experts), shared_ckpts=tuple(shared))

    def read_ffn(self, ckpt: Checkpoint, layer: int, meta: bool = False) -> LayerFFNs:  # type: ignore[override]
        def reader(ckpts: tuple[Checkpoint, ...]) -> LazyExperts:
            return LazyExperts(len(ckpts), lambda j: Adapter.read_ffn(self, ckpts[j], layer, meta))

        like = Adapter.read_ffn(self, self.expert_ckpts[0], layer, meta=True)
        return LayerFFNs(reader(self.expert_ckpts), like, meta, reader(self.shared_ckpts))


def open_source(folder: Path, name: str, base: Checkpoint, adapter: Adapter, layers: list[int]) -> Checkpoint:
    """A source's checkpoint, refused in one line unless it matches BASE's family, shapes and vocabulary."""
    ckpt = Checkpoint(folder)
    ours, theirs = base.config.get("model_type"), ckpt.config.get("model_type")
    if theirs != ours:
        raise MoeifyError(f"expert source {name} is a {theirs} model but BASE is {ours}; experts must come from "
                          f"models of BASE's family (fine-tunes of it)")
    ckpt = adapter.loaded(ckpt)
    check_weights(ckpt, adapter_for(ckpt.config))  # a complete model of its own config, first
    if adapter_for(ckpt.config) != adapter:
        raise MoeifyError(f"expert source {name} has FFN biases {'on' if adapter_for(ckpt.config).bias else 'off'}, "
                          f"BASE {'on' if adapter.bias else 'off'}; experts must have BASE's FFN layout")
    for field_ in (adapter.hidden_field, "vocab_size", adapter.layers_field):
        if ckpt.config.get(field_) != base.config.get(field_):
            raise MoeifyError(f"expert source {name} has {field_}={ckpt.config.get(field_)} but BASE has "
                              f"{base.config.get(field_)}; experts must come from models shaped like BASE")
    if adapter.activation(ckpt.config) != adapter.activation(base.config):
        raise MoeifyError(f"expert source {name} uses activation {adapter.activation(ckpt.config)}, BASE "
                          f"{adapter.activation(base.config)}; its FFN would compute something else in the MoE")
    _same_ffn_shapes(ckpt, name, base, adapter, layers)
    _same_vocabulary(ckpt.folder, name, base.folder)
    return ckpt


def _same_ffn_shapes(ckpt: Checkpoint, name: str, base: Checkpoint, adapter: Adapter, layers: list[int]) -> None:
    for layer in layers:
        for tensor in adapter.ffn_names(layer).values():
            if ckpt.info(tensor).shape != base.info(tensor).shape:
                raise MoeifyError(f"expert source {name}: {tensor} is {tuple(ckpt.info(tensor).shape)}, BASE's is "
                                  f"{tuple(base.info(tensor).shape)}; experts must have BASE's FFN shapes")


def _same_vocabulary(folder: Path, name: str, base_folder: Path) -> None:
    """Same token ids mean the same tokens: the vocabularies of tokenizer.json agree where both have one."""
    if _same_bytes(folder / "tokenizer.json", base_folder / "tokenizer.json"):
        return  # the usual case (fine-tunes save their base's tokenizer), and parsing a 128k vocabulary is slow
    vocab = [_vocab(f / "tokenizer.json") for f in (folder, base_folder)]
    if None not in vocab and vocab[0] != vocab[1]:
        raise MoeifyError(f"expert source {name}'s tokenizer vocabulary differs from BASE's; experts must share "
                          f"BASE's tokenizer")


def _same_bytes(a: Path, b: Path) -> bool:
    try:
        return filecmp.cmp(a, b, shallow=False)
    except OSError:
        return False


@functools.lru_cache(maxsize=8)  # BASE's is compared with every source's: read it once
def _vocab(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    model = data.get("model") if isinstance(data, dict) else None
    vocab = model.get("vocab") if isinstance(model, dict) else None
    return vocab if isinstance(vocab, (dict, list)) else None


# ---------------------------------------------------------------------------- the transform


def merge_layer(ffns: LayerFFNs, spec: Spec, layer: int, router: Callable[[], torch.Tensor] | None,
                scales: Sequence[float], shared_scales: Sequence[float]) -> MoELayer:
    """Each source's FFN as an expert (cut into spec.granularity pieces sharing its router row).

    router() gives (E, H), one row per source expert; the G pieces of one source repeat its row
    (pieces_router) and their down projection is scaled by G (their renormalised weights are 1/G of
    the source's). It is not called when planning (meta tensors); router=None leaves zeros in its
    place (rows learnt alongside the writing, written last from Merge.routers). Building the layer
    reads no expert.
    """
    G, share = spec.granularity, 1.0 / (len(ffns.shared) + 1)
    check_divisible(ffns.like.intermediate_size, G)

    def cut(j: int) -> list[FFN]:
        noisy = add_noise(ffns.experts[j], spec.noise, generator(spec.seed, layer, "expert", j))
        return pieces(noisy, G)

    by_source = LazyExperts(len(ffns.experts), cut)  # the pieces of the last source read
    experts = LazyExperts(len(ffns.experts) * G,
                          lambda j: by_source[j // G][j % G].scaled(G * share * scales[j // G]))
    shared = LazyExperts(len(ffns.shared), lambda s: ffns.shared[s].scaled(share * shared_scales[s]))
    like, shape = ffns.like.up, (len(ffns.experts), ffns.like.hidden_size)
    if ffns.meta:
        rows = like.new_empty(shape)
    elif router is None:  # a stand-in of the right shape: tensors derived from it (Qwen2-MoE's) stay real
        rows = torch.zeros(shape)
    else:
        rows = router()
    return MoELayer(experts=experts, router=pieces_router(rows.to(like.dtype), G), topk=spec.active_experts,
                    shared=shared)


def pieces_router(rows: torch.Tensor, granularity: int) -> torch.Tensor:
    """(E * G, H): each source's row once for each of its G pieces."""
    return rows.repeat_interleave(granularity, dim=0)


# ---------------------------------------------------------------------------- the whole merge


def merge_spec(experts: Sequence[ExpertSource], shared: Sequence[ExpertSource], **options) -> Spec:
    """The Spec of a merge: one routed expert per source entry, one shared expert per shared entry."""
    from moeify.spec import Gate, Mode, RouterInit

    gate = Gate(options.get("gate", Gate.RANDOM))
    return Spec(mode=Mode.MERGE, experts=len(experts), shared_experts=len(shared),
                expert_sources=[e.to_dict() for e in experts],
                shared_sources=[{"source": s.source, "scale": s.scale} for s in shared],
                router_init=RouterInit.ZEROS if gate is Gate.ZEROS else RouterInit.RANDOM, **options)


def sources_of(spec: Spec) -> tuple[list[ExpertSource], list[ExpertSource]]:
    """(routed, shared) sources of a merge spec, checked against its expert counts."""
    for field_ in ("expert_sources", "shared_sources"):
        if not isinstance(getattr(spec, field_), (list, type(None))):  # a string would be read letter by letter
            raise MoeifyError(f"{field_} must be a list of sources, one entry per expert")
    experts = [ExpertSource.from_dict(d, f"expert_sources[{j}]") for j, d in enumerate(spec.expert_sources or [])]
    shared = [ExpertSource.from_dict(d, f"shared_sources[{j}]") for j, d in enumerate(spec.shared_sources or [])]
    if len(experts) != spec.experts:
        raise MoeifyError(f"a merge has one routed expert per entry of expert_sources: experts is {spec.experts} "
                          f"but expert_sources lists {len(experts)}")
    if len(shared) != spec.shared_experts:
        raise MoeifyError(f"a merge has one shared expert per entry of shared_sources: shared_experts is "
                          f"{spec.shared_experts} but shared_sources lists {len(shared)}")
    return experts, shared


@dataclass
class Merge:
    """What the conversion pass needs for a merge: the reader, the transform, and moeify.json's notes.

    routers: with prompt-learnt gates, layer -> its router (the transform's is a stand-in), which the
    conversion writes after every other tensor, so that the writer never waits for a row.
    """

    reader: MergeReader
    transform: Callable[[LayerFFNs, Spec, int], MoELayer]
    learning: Learning | None = None  # prompt-learnt gates
    routers: Callable[[int], torch.Tensor] | None = None

    def running(self, on_layer: Callable[[int, int], None]) -> AbstractContextManager:
        """The context the conversion runs in: prompt-learnt gates are learnt alongside it."""
        return self.learning.running(on_layer) if self.learning else nullcontext()

    def notes(self) -> dict:
        """moeify.json's routing report (prompt-learnt gates): asked for once the shards are written."""
        return {"routing": self.learning.gates().report} if self.learning else {}

    def lines(self) -> list[str]:
        """The same for the terminal."""
        from moeify import gates

        return gates.routing_lines(self.learning.gates()) if self.learning else []


def prepare(base_folder: Path, spec: Spec, folders: dict[str, Path]) -> Merge:
    """Open and check every source against BASE, set up the gates, and bind the transform.

    Prompt-learnt gates are learnt inside Merge.running(), alongside the conversion, which writes
    the routers last: the writer waits for a layer's row only once every expert is written.
    """
    from moeify import gates

    experts, shared = sources_of(spec)
    gates.check_prompts(spec, experts)
    base = Checkpoint(base_folder)
    adapter = adapter_for(base.config)
    base = adapter.loaded(base)
    layers = spec.layers(adapter.num_layers(base.config))
    opened = {name: open_source(folder, name, base, adapter, layers) for name, folder in folders.items()}
    reader = MergeReader.of(adapter, [opened[e.source] for e in experts], [opened[s.source] for s in shared])
    hidden = int(base.config[adapter.hidden_field])
    learning = gates.Learning(spec, base_folder, adapter, layers, experts) if spec.gate in gates.PROMPTED else None
    scales, shared_scales = [e.scale for e in experts], [s.scale for s in shared]

    def transform(ffns: LayerFFNs, spec_: Spec, layer: int) -> MoELayer:
        if learning is not None:  # the rows come apart (Merge.routers)
            learning.check()  # a failure on the gates' thread stops the writer at its next layer
            return merge_layer(ffns, spec_, layer, None, scales, shared_scales)
        return merge_layer(ffns, spec_, layer, lambda: gates.fixed_router(spec, layer, len(experts), hidden),
                           scales, shared_scales)

    if learning is None:
        return Merge(reader, transform)
    return Merge(reader, transform, learning, lambda layer: pieces_router(learning.row(layer), spec.granularity))
