"""Parameter arithmetic from config.json alone: what a checkpoint holds, and what a conversion would make.

No weights are read. A model is described layer by layer (`Block`): attention and norms, then
either a dense FFN or routed experts, a router and shared experts. Families differ only in what
config.json leaves implicit (biases, extra norms, learned positions), which `LAYOUTS` states; the
FFN's shape (gated or not, biases) comes from the family's adapter, as in a conversion.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from enum import Enum
from typing import Any

from moeify.errors import MoeifyError
from moeify.spec import Spec
from moeify.validation import check_config

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# What a Python process with moeify, torch and transformers loaded holds before converting
# anything (measured: 258 MB), rounded up.
RUNTIME_BYTES = 300 * 10**6


class Kind(str, Enum):
    DENSE = "dense"
    NATIVE = "native"  # a transformers MoE architecture
    REMOTE = "remote"  # moeify's own format (model_type "moeify")


@dataclass(frozen=True)
class Layout:
    """What a family's config.json does not say about its non-FFN parameters."""

    norms: int = 2  # norms per decoder layer (gemma: four)
    layer_norm: bool = False  # LayerNorm carries a bias beside its weight
    qkv_bias: bool | str = "attention_bias"  # fixed, or the config field that says
    o_bias: bool | str = "attention_bias"
    qk_norm: str | None = None  # "head": one head_dim vector each; "all": across all heads (olmo2)
    positions: str | None = None  # config field sizing learned absolute positions
    mla: bool = False  # DeepSeek-V2/V3 multi-head latent attention
    grouped: bool = True  # grouped-query attention possible (num_key_value_heads is read)
    width: str = "intermediate_size"  # config field of the dense FFN's width (absent: 4 x hidden)
    # The FFN's shape for a family that has no adapter yet; an adapter, when present, decides.
    gated: bool = True
    ffn_bias: bool | str = "mlp_bias"


LAYOUTS: dict[str, Layout] = {
    "llama": Layout(),
    "granite": Layout(),
    "mistral": Layout(qkv_bias=False, o_bias=False),
    "mixtral": Layout(qkv_bias=False, o_bias=False),
    "granitemoe": Layout(),
    "granitemoeshared": Layout(),
    "phi3": Layout(qkv_bias=False, o_bias=False),
    "qwen2": Layout(qkv_bias=True, o_bias=False),
    "qwen2_moe": Layout(qkv_bias="qkv_bias", o_bias=False),
    "qwen3": Layout(qk_norm="head"),
    "qwen3_moe": Layout(qk_norm="head"),
    "gemma2": Layout(norms=4),
    "gemma3_text": Layout(norms=4, qk_norm="head"),
    "olmo2": Layout(qk_norm="all"),
    "gpt2": Layout(layer_norm=True, qkv_bias=True, o_bias=True, positions="n_positions", width="n_inner",
                   grouped=False, gated=False, ffn_bias=True),
    "gpt_neox": Layout(layer_norm=True, grouped=False, gated=False, ffn_bias=True),
    "deepseek": Layout(),  # DeepSeekMoE (remote code): plain multi-head attention
    "deepseek_v2": Layout(mla=True),
    "deepseek_v3": Layout(mla=True),
}


@dataclass(frozen=True)
class Block:
    """One decoder layer's parameters by role."""

    attention: int  # attention projections and every norm of the layer
    ffn: int = 0  # a dense FFN (0 in a MoE layer)
    experts: int = 0  # routed experts
    topk: int = 0  # routed experts a token uses
    expert: int = 0  # parameters of one routed expert
    expert_width: int = 0  # intermediate size of one routed expert
    shared_experts: int = 0
    shared_width: int = 0  # intermediate size of one shared expert
    shared: int = 0  # every shared expert together
    router: int = 0  # router rows and any shared-expert gate; PEER: query projections and sub-keys
    # PEER (product-key retrieval): each routed expert is one neuron on an n x n grid of `experts`
    # slots, of which `neurons` hold one; `heads` retrieval heads find topk of them together.
    heads: int = 0  # 0: an ordinary router
    neurons: int = 0

    @property
    def moe(self) -> bool:
        return self.experts > 0

    @property
    def peer(self) -> bool:
        return self.heads > 0

    @property
    def neuron_share(self) -> float:
        """PEER: share of the FFN's neurons a token uses, shared neurons counted."""
        return (self.topk + self.shared_experts) / (self.neurons + self.shared_experts)

    @property
    def total(self) -> int:
        return self.attention + self.ffn + self.experts * self.expert + self.shared + self.router

    @property
    def active(self) -> int:
        return self.total - (self.experts - self.topk) * self.expert

    @property
    def ffn_total(self) -> int:
        return self.total - self.attention


@dataclass(frozen=True)
class Anatomy:
    """A whole model: the layers, plus embeddings, LM head, final norm and learned positions."""

    architecture: str
    kind: Kind
    hidden: int
    blocks: tuple[Block, ...]
    outside: int
    vocab: int = 0
    dense_width: int = 0  # the dense FFN's intermediate size (0 if the model has none)
    gated: bool = True
    ffn_bias: bool = False

    @property
    def total(self) -> int:
        return self.outside + sum(b.total for b in self.blocks)

    @property
    def active(self) -> int:
        return self.outside + sum(b.active for b in self.blocks)

    @property
    def ffn_share(self) -> float:
        return sum(b.ffn_total for b in self.blocks) / self.total

    @property
    def moe_layers(self) -> list[int]:
        return [i for i, b in enumerate(self.blocks) if b.moe]

    def sizes(self) -> dict[str, int]:
        """Bytes on disk of all parameters in each floating dtype."""
        return {name: self.total * size for name, size in DTYPE_BYTES.items()}

    def groups(self) -> list[tuple[list[int], Block]]:
        """Layers grouped by FFN structure (dense, or one MoE shape), in order of first appearance."""
        runs: dict[Block, list[int]] = {}
        first: dict[Block, Block] = {}
        for i, block in enumerate(self.blocks):
            key = dataclasses.replace(block, attention=0)
            runs.setdefault(key, []).append(i)
            first.setdefault(key, block)
        return [(indices, first[key]) for key, indices in runs.items()]


# transformers' defaults (configuration_<family>.py, v5) of the fields the arithmetic reads, for the
# families it knows: config.json may leave any of them out, and importing transformers to fill them
# costs ~1 s. A default transformers derives (head_dim = hidden // heads, key-value heads = heads,
# GPT-2's n_inner = 4 x hidden) is computed where the field is read, so a family lists head_dim or
# num_key_value_heads only where transformers fixes a number. tests/test_inspect_defaults.py checks
# every entry against transformers' own configs.
_LLAMA = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
              num_attention_heads=32, tie_word_embeddings=False, attention_bias=False, mlp_bias=False)
_MISTRAL = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False)
_QWEN2 = dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
              num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False)
_GEMMA2 = dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
               num_attention_heads=8, num_key_value_heads=4, head_dim=256, tie_word_embeddings=True,
               attention_bias=False)
_GRANITE_MOE = _LLAMA | dict(num_local_experts=8, num_experts_per_tok=2)
_MLA = dict(tie_word_embeddings=False, attention_bias=False, kv_lora_rank=512, q_lora_rank=1536,
            qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128)
DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": _LLAMA,
    "granite": _LLAMA,
    "granitemoe": _GRANITE_MOE,
    "granitemoeshared": _GRANITE_MOE | dict(shared_intermediate_size=0),
    "olmo2": _LLAMA | dict(vocab_size=50304),
    "mistral": _MISTRAL,
    "mixtral": _MISTRAL | dict(num_local_experts=8, num_experts_per_tok=2),
    "phi3": dict(vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                 num_attention_heads=32, tie_word_embeddings=False),
    "qwen2": _QWEN2,
    "qwen3": _QWEN2 | dict(head_dim=128, attention_bias=False),
    "qwen2_moe": _QWEN2 | dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=24, num_attention_heads=16,
                               num_key_value_heads=16, num_experts=60, num_experts_per_tok=4,
                               moe_intermediate_size=1408, shared_expert_intermediate_size=5632,
                               decoder_sparse_step=1, qkv_bias=True),
    "qwen3_moe": _QWEN2 | dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=24, num_key_value_heads=4,
                               num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
                               decoder_sparse_step=1, attention_bias=False),
    "gemma2": _GEMMA2,
    "gemma3_text": _GEMMA2 | dict(vocab_size=262208),
    "gpt2": dict(vocab_size=50257, n_embd=768, n_layer=12, n_head=12, n_positions=1024, tie_word_embeddings=True),
    "gpt_neox": dict(vocab_size=50432, hidden_size=6144, intermediate_size=24576, num_hidden_layers=44,
                     num_attention_heads=64, tie_word_embeddings=False, attention_bias=True),
    "deepseek": {},  # DeepSeekMoE's remote code: transformers has no defaults for it
    "deepseek_v2": _MLA | dict(vocab_size=102400, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                               num_attention_heads=32, moe_intermediate_size=1407, n_routed_experts=64,
                               n_shared_experts=2, first_k_dense_replace=0),
    "deepseek_v3": _MLA | dict(vocab_size=129280, hidden_size=7168, intermediate_size=18432, num_hidden_layers=61,
                               num_attention_heads=128, num_key_value_heads=128, moe_intermediate_size=2048,
                               n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8,
                               first_k_dense_replace=3),
}


class Fields:
    """Config fields by any of their names, with the family's defaults where config.json is silent.

    config.json's own values come first. A field it lacks under every name takes the family's
    default from DEFAULTS; only a family without an entry there asks transformers (~1 s to import).
    """

    def __init__(self, config: dict):
        self.raw = config
        self.defaults = DEFAULTS.get(config.get("model_type"))

    @functools.cached_property
    def normalised(self) -> Any:
        return _normalised(self.raw)

    def get(self, *names: str, default: Any = None) -> Any:
        for name in names:
            if self.raw.get(name) is not None:
                return self.raw[name]
        value = self._default(names)
        return default if value is None else value

    def _default(self, names: tuple[str, ...]) -> Any:
        if self.defaults is None:
            found = (getattr(self.normalised, name, None) for name in names) if self.normalised is not None else ()
            return next((value for value in found if value is not None), None)
        if any(name in self.raw for name in names):  # an explicit null: transformers keeps it, or derives
            return None
        return next((self.defaults[name] for name in names if name in self.defaults), None)

    def need(self, *names: str) -> int:
        """A size the arithmetic cannot do without: a clear line when config.json lacks it."""
        value = self.get(*names)
        if value is None:
            raise MoeifyError(f"config.json of this {self.raw.get('model_type')} model lacks {names[0]}; "
                              f"fix or re-download it")
        return int(value)

    def flag(self, spec: bool | str) -> bool:
        return spec if isinstance(spec, bool) else bool(self.get(spec, default=False))


def _normalised(config: dict) -> Any:
    """The transformers config object, which fills defaults and aliases (n_embd -> hidden_size)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.for_model(**config)
    except Exception:  # a family transformers does not know: raw fields only
        return None


def ffn_params(hidden: int, width: int, gated: bool, bias: bool) -> int:
    """One FFN: up (and gate) H->W, down W->H, with their biases."""
    projections = 3 if gated else 2
    return projections * hidden * width + (((projections - 1) * width + hidden) if bias else 0)


def describe(config: dict) -> Anatomy:
    """The anatomy of any checkpoint this config describes: dense, native MoE or moeify remote."""
    check_config(config)  # every number below is an integer within moeify's bounds, or null
    if config.get("model_type") == "moeify":
        return _remote(config)
    fields = Fields(config)
    model_type = config.get("model_type")
    layout = LAYOUTS.get(model_type)
    if layout is None:
        raise MoeifyError(f"cannot inspect architecture {model_type!r}; known: {', '.join(sorted(LAYOUTS))}")
    hidden = fields.need("hidden_size", "n_embd", "d_model")
    layers = fields.need("num_hidden_layers", "n_layer")
    gated, bias = _ffn_shape(model_type, fields, layout)
    width = int(fields.get(layout.width, default=0) or 4 * hidden)
    attention = _attention(fields, layout, hidden)
    dense = Block(attention, ffn=ffn_params(hidden, width, gated, bias))
    moe = _native_moe(fields, model_type, hidden, attention)
    blocks = tuple(moe(i) or dense for i in range(layers))
    kind = Kind.NATIVE if any(b.moe for b in blocks) else Kind.DENSE
    vocab = fields.need("vocab_size")
    return Anatomy(model_type, kind, hidden, blocks, _outside(fields, layout, hidden), vocab, width, gated, bias)


def _ffn_shape(model_type: str, fields: Fields, layout: Layout) -> tuple[bool, bool]:
    """Gated or not, biased or not: the family's adapter says, as it does for a conversion."""
    from moeify.adapters import ADAPTERS, adapter_for

    if model_type not in ADAPTERS:
        return layout.gated, fields.flag(layout.ffn_bias)
    adapter = adapter_for(fields.raw)
    return adapter.gate is not None, adapter.bias


def _attention(fields: Fields, layout: Layout, hidden: int) -> int:
    """Attention projections and the layer's norms."""
    norm = hidden * (2 if layout.layer_norm else 1)
    if layout.mla:
        return _mla(fields, hidden) + layout.norms * norm
    heads = fields.need("num_attention_heads", "n_head")
    kv_heads = int(fields.get("num_key_value_heads", default=heads)) if layout.grouped else heads
    head_dim = int(fields.get("head_dim", default=0) or hidden // heads)
    q, kv = heads * head_dim, kv_heads * head_dim
    params = hidden * (q + 2 * kv) + q * hidden
    params += (q + 2 * kv) * fields.flag(layout.qkv_bias) + hidden * fields.flag(layout.o_bias)
    if layout.qk_norm == "head":
        params += 2 * head_dim
    elif layout.qk_norm == "all":
        params += q + kv
    return params + layout.norms * norm


def _mla(fields: Fields, hidden: int) -> int:
    """DeepSeek-V2/V3 multi-head latent attention: low-rank query and key-value paths."""
    heads = fields.need("num_attention_heads")
    nope, rope = fields.need("qk_nope_head_dim"), fields.need("qk_rope_head_dim")
    v_dim, kv_rank = fields.need("v_head_dim"), fields.need("kv_lora_rank")
    q_rank = fields.get("q_lora_rank")
    bias = bool(fields.get("attention_bias", default=False))
    qk = heads * (nope + rope)
    q = hidden * qk if not q_rank else hidden * q_rank + bias * q_rank + q_rank + q_rank * qk
    kv = hidden * (kv_rank + rope) + bias * (kv_rank + rope) + kv_rank + kv_rank * heads * (nope + v_dim)
    return q + kv + heads * v_dim * hidden + bias * hidden


def _outside(fields: Fields, layout: Layout, hidden: int) -> int:
    vocab = fields.need("vocab_size")
    tied = bool(fields.get("tie_word_embeddings", default=False))
    params = vocab * hidden * (1 if tied else 2) + hidden * (2 if layout.layer_norm else 1)
    if layout.positions:
        params += fields.need(layout.positions) * hidden
    return params


def _native_moe(fields: Fields, model_type: str, hidden: int, attention: int):
    """A function from layer index to its MoE block (None for a dense layer) for native MoE families."""
    if model_type in ("mixtral", "granitemoe", "granitemoeshared"):
        experts, width = fields.need("num_local_experts"), fields.need("intermediate_size")
        shared = int(fields.get("shared_intermediate_size", default=0) or 0)  # Granite-MoE-Shared: one ungated MLP
        block = _moe_block(attention, hidden, experts, fields.need("num_experts_per_tok"), width,
                           shared_width=shared, shared_experts=1 if shared else 0)
        return lambda i: block
    if model_type in ("qwen2_moe", "qwen3_moe"):
        experts = int(fields.get("num_experts", "num_local_experts", default=0))
        qwen2 = model_type == "qwen2_moe"
        shared = int(fields.get("shared_expert_intermediate_size", default=0)) if qwen2 else 0
        # Qwen2-MoE always builds its shared expert's (1, H) sigmoid gate, even at width 0.
        block = _moe_block(attention, hidden, experts, fields.need("num_experts_per_tok"),
                           fields.need("moe_intermediate_size"), shared_width=shared,
                           shared_experts=1 if shared else 0, gate=hidden if qwen2 else 0)
        dense_only = set(fields.get("mlp_only_layers", default=[]) or [])
        step = int(fields.get("decoder_sparse_step", default=1) or 1)
        return lambda i: block if experts and i not in dense_only and (i + 1) % step == 0 else None
    if model_type.startswith("deepseek"):
        experts = int(fields.get("n_routed_experts", default=0) or 0)
        width = int(fields.get("moe_intermediate_size", default=0) or 0)
        shared_experts = int(fields.get("n_shared_experts", default=0) or 0)
        # DeepSeek-V3 routes with a per-expert bias beside the router weights.
        block = _moe_block(attention, hidden, experts, int(fields.get("num_experts_per_tok", default=0) or 0), width,
                           shared_width=shared_experts * width, shared_experts=shared_experts,
                           gate=experts if model_type == "deepseek_v3" else 0)
        first, freq = int(fields.get("first_k_dense_replace", default=0)), int(fields.get("moe_layer_freq", default=1))
        return lambda i: block if experts and i >= first and i % freq == 0 else None
    return lambda i: None


def _moe_block(attention: int, hidden: int, experts: int, topk: int, width: int, *, gated: bool = True,
               bias: bool = False, shared_width: int = 0, shared_experts: int = 0, gate: int = 0) -> Block:
    """A MoE layer of routed experts of one width, optional shared experts (one FFN of shared_width)."""
    return Block(attention, experts=experts, topk=topk, expert=ffn_params(hidden, width, gated, bias),
                 expert_width=width, shared_experts=shared_experts,
                 shared_width=shared_width // shared_experts if shared_experts else 0,
                 shared=ffn_params(hidden, shared_width, gated, bias) if shared_width else 0,
                 router=experts * hidden + gate)


def _remote(config: dict) -> Anatomy:
    """moeify's remote format: the dense source config plus a `moe` section (configuration_moeify.py)."""
    base, moe = config.get("base_config"), config.get("moe")
    if not isinstance(base, dict) or not isinstance(moe, dict):
        raise MoeifyError("this moeify config.json lacks base_config or moe; re-run the conversion")
    dense = describe(base)
    gated = bool(moe.get("gated", dense.gated))
    bias = bool(moe.get("bias", dense.ffn_bias))
    width = int(moe.get("expert_intermediate_size") or dense.dense_width)
    shared_width = int(moe.get("shared_intermediate_size") or width)
    shared_count = int(moe.get("num_shared_experts") or 0)
    routed = _moe_block(0, dense.hidden, int(moe["num_experts"]), int(moe["num_experts_per_tok"]), width,
                        gated=gated, bias=bias)
    # Each shared expert is its own FFN; an output bias is one (H,) vector added once per block.
    extra = shared_count * ffn_params(dense.hidden, shared_width, gated, bias)
    extra += dense.hidden if moe.get("output_bias") else 0
    layers = set(moe.get("moe_layers") or [])
    blocks = tuple(
        dataclasses.replace(routed, attention=b.attention, shared_experts=shared_count,
                            shared_width=shared_width if shared_count else 0, shared=extra)
        if i in layers else b
        for i, b in enumerate(dense.blocks)
    )
    peer = config.get("peer")
    if isinstance(peer, dict):
        blocks = _with_peer(blocks, peer, dense)
    return dataclasses.replace(dense, kind=Kind.REMOTE, blocks=blocks)


PEER_FIELDS = {"gated", "bias", "num_neurons", "num_sub_keys", "num_heads", "key_dim", "num_shared_neurons",
               "query_norm", "output_bias", "num_neurons_per_head", "peer_layers"}


def _with_peer(blocks: tuple[Block, ...], peer: dict, dense: Anatomy) -> tuple[Block, ...]:
    """The layers of a remote config's `peer` section as PEER blocks (see PeerBlock in the modeling code).

    Stored: n² neuron slots (padding included), per head a query projection (d, H) and two sub-key
    tables (n, d/2), the shared neurons, the output bias. A token uses its shared neurons, the
    distinct neurons its heads retrieve (at most heads x top-k), and every query and sub-key
    (both halves are scored in full: the O(√N) routing cost).
    """
    if not PEER_FIELDS <= peer.keys():  # moeify writes them all; the remote code (transformers) fills the rest
        from moeify.targets.remote_code.configuration_moeify import PEER_DEFAULTS

        peer = {**PEER_DEFAULTS, **peer}
    gated, bias = bool(peer["gated"]), bool(peer["bias"])
    neurons = int(peer["num_neurons"] or dense.dense_width)
    n = int(peer["num_sub_keys"] or math.isqrt(neurons - 1) + 1)
    heads, d, shared = int(peer["num_heads"]), int(peer["key_dim"]), int(peer["num_shared_neurons"])
    # One neuron: gate and up rows (their biases) and a down column; the down bias is output_bias.
    neuron = ffn_params(dense.hidden, 1, gated, bias) - (dense.hidden if bias else 0)
    query = heads * d * dense.hidden + (2 * heads * d if peer["query_norm"] else 0)
    extra = ffn_params(dense.hidden, shared, gated, bias) if shared else 0  # with a (zero) down bias
    extra += dense.hidden if peer["output_bias"] else 0
    layer = Block(0, experts=n * n, topk=min(heads * int(peer["num_neurons_per_head"]), neurons),
                  expert=neuron, expert_width=1, shared_experts=shared, shared_width=1 if shared else 0,
                  shared=extra, router=query + heads * n * d, heads=heads, neurons=neurons)
    chosen = set(peer["peer_layers"] or [])
    return tuple(dataclasses.replace(layer, attention=b.attention) if i in chosen else b
                 for i, b in enumerate(blocks))


# ---------------------------------------------------------------------------- planning a conversion


# Tensors a native target writes beyond the routed experts and router, per MoE layer.
TARGET_EXTRAS = {"qwen2_moe": lambda hidden: hidden}  # the (1, H) shared-expert gate, always present


@dataclass(frozen=True)
class Plan:
    """What upcycling a dense model with a spec gives, and what the conversion needs."""

    result: Anatomy
    target: str  # the output format conversion would choose
    reason: str
    peak_memory: int  # bytes of RAM the streaming conversion needs at most
    disk: int  # bytes of free disk the output needs
    dtype: str


def upcycled(config: dict, spec: Spec) -> Plan:
    """What conversion.convert would write when upcycling the dense model of `config` with `spec`.

    Each of the N copies is cut into G pieces of W/G neurons (a piece keeps the whole down bias),
    S shared experts are full copies of the FFN, and the router has one row per piece.
    """
    from moeify.adapters import adapter_for
    from moeify.targets import choose

    dense = describe(config)
    if dense.kind is not Kind.DENSE:
        raise MoeifyError(f"conversion options apply to dense sources; this is already a {dense.kind.value} MoE")
    if dense.dense_width % spec.granularity:
        raise MoeifyError(f"--granularity {spec.granularity} does not divide the intermediate size "
                          f"{dense.dense_width}; choose a divisor")
    adapter = adapter_for(config)
    chosen = spec.layers(len(dense.blocks))
    target, reason = choose(adapter, config, spec, chosen)
    extra = TARGET_EXTRAS.get(target.name, lambda hidden: 0)(dense.hidden)
    full = ffn_params(dense.hidden, dense.dense_width, dense.gated, dense.ffn_bias)
    width = dense.dense_width // spec.granularity
    moe = Block(0, experts=spec.routed_experts, topk=spec.active_experts,
                expert=ffn_params(dense.hidden, width, dense.gated, dense.ffn_bias), expert_width=width,
                shared_experts=spec.shared_experts, shared_width=dense.dense_width if spec.shared_experts else 0,
                shared=spec.shared_experts * full,
                router=spec.routed_experts * dense.hidden + extra)
    blocks = tuple(dataclasses.replace(moe, attention=b.attention) if i in chosen else b
                   for i, b in enumerate(dense.blocks))
    kind = Kind.REMOTE if target.name == "remote" else Kind.NATIVE
    result = dataclasses.replace(dense, architecture=target.name if kind is Kind.NATIVE else dense.architecture,
                                 kind=kind, blocks=blocks, outside=dense.outside + target.added_params(config, chosen))
    source = source_dtype(config)
    dtype = source if spec.dtype.value == "auto" else spec.dtype.value
    itemsize = max(DTYPE_BYTES[source], DTYPE_BYTES[dtype])
    # One layer at a time: the largest pass-through tensor (the embedding) read and cast, or one
    # FFN read, cast, redrawn, noised and cut. Nothing grows with the number of experts. Measured on
    # SmolLM2-135M (fp32, 8 experts): 407 MB peak, 516 MB with noise, drop and bfloat16; this says 526 MB.
    working = max(2 * dense.vocab * dense.hidden, 6 * full) * itemsize
    return Plan(result, target.name, reason, RUNTIME_BYTES + working, result.total * DTYPE_BYTES[dtype], dtype)


def source_dtype(config: dict) -> str:
    """The dtype config.json states; float32 (the safe guess for disk and memory) when it does not."""
    name = config.get("dtype") or config.get("torch_dtype")
    return name if name in DTYPE_BYTES else "float32"
