"""Which engines compute an output exactly: one table of what each engine's code honours.

transformers is the reference: the exactness tests compare its forward pass of every output
with the dense source. Another engine runs an output exactly when it computes what transformers
computes for the same config.json and weights, i.e. when it honours every feature the config
uses. The table below says, per engine and native architecture, what its implementation does
with each such feature, read from its code:

- llama.cpp, as vendored in llama-cpp-python 0.3.36: src/models/llama.cpp (Mixtral is its
  "llama" architecture with experts), src/models/qwen2moe.cpp, src/models/qwen3moe.cpp,
  src/models/granite-moe.cpp and granite.cpp, src/llama-graph.cpp (build_moe_ffn), and its
  converter convert_hf_to_gguf.py with conversion/{base,llama,qwen,granite}.py. Every claim is
  also checked by running llama.cpp on tiny models: benchmarks/engines.py, `pytest -m engines`.
- vLLM: vllm/model_executor/models/{mixtral,qwen2_moe,qwen3_moe,granitemoe,granitemoeshared}.py
  as stored in the search index (not necessarily the newest versions). Read only: vLLM needs a
  GPU and is not run here.

Targets consult the table to choose constructions every engine in scope computes exactly
(`all_honour`; scope: all three for --engine any, else the one asked for and transformers),
and every output records one verdict per engine (`verdicts`), refused before writing when
the engine asked for with --engine would not compute it exactly (`require`).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from moeify.errors import MoeifyError
from moeify.spec import Engine, Format, Mode, RouterInit, Spec

CONCRETE = (Engine.TRANSFORMERS, Engine.VLLM, Engine.LLAMACPP)
NAMES = {Engine.TRANSFORMERS: "transformers", Engine.VLLM: "vLLM", Engine.LLAMACPP: "llama.cpp"}
REMOTE = "moeify"  # model_type of the remote format's config


class Renormalise(str, Enum):
    CONFIG = "config"  # as the config says (norm_topk_prob; Mixtral and Granite-MoE always)
    ALWAYS = "always"  # renormalises the top-k weights whatever norm_topk_prob says
    NEVER = "never"  # never renormalises, whatever norm_topk_prob says


class QkvBias(str, Enum):
    CONFIG = "config"  # q/k/v biases where the config says (qkv_bias, attention_bias)
    ALWAYS = "always"  # always builds q/k/v biases and expects them in the checkpoint
    NEVER = "never"  # has no attention biases (a checkpoint with them fails to load)


@dataclass(frozen=True)
class Honours:
    """What one engine's implementation of one architecture does with the config's features."""

    renormalise: Renormalise = Renormalise.CONFIG  # top-k routing weights summed to 1, or not
    dense_layers: bool = True  # mlp_only_layers / decoder_sparse_step: some layers keep a dense FFN
    tied_embeddings: bool = True  # tie_word_embeddings: the output projection is the embedding matrix
    qkv_bias: QkvBias = QkvBias.CONFIG
    head_dim: bool = True  # an explicit head_dim; False: hidden_size / num_attention_heads is assumed
    sliding_window: bool = True  # a sliding attention window
    rope_types: frozenset[str] | None = None  # rope scaling types computed (None: all transformers has)
    shared_gate_at_zero: bool = True  # sigmoid(0) = 0.5 for a zero shared-expert gate logit
    shared_width_zero: bool = True  # shared_expert_intermediate_size 0 (no shared expert)
    runs: bool = True  # has an implementation at all
    read_from: str = ""  # where these facts were read

    @property
    def renormalises(self) -> bool:
        """Whether renormalised top-k weights (norm_topk_prob true) can be computed at all."""
        return self.renormalise is not Renormalise.NEVER

    @property
    def qkv_bias_optional(self) -> bool:
        return self.qkv_bias is not QkvBias.ALWAYS


# transformers computes every config as written: it is the reference.
REFERENCE = Honours(read_from="transformers (reference; exactness tests)")

# Rope scaling types llama.cpp's converter writes as hparams (conversion/base.py), plus llama3's
# frequency factors where the architecture's graph applies them.
LLAMACPP_ROPE = frozenset({"default", "linear", "yarn", "longrope", "su", "llama3"})

TABLE: dict[tuple[Engine, str], Honours] = {
    **{(Engine.TRANSFORMERS, arch): REFERENCE
       for arch in ("mixtral", "qwen2_moe", "qwen3_moe", "granitemoe", "granitemoeshared", REMOTE)},
    # Mixtral: llama.cpp's "llama" architecture with experts.
    (Engine.LLAMACPP, "mixtral"): Honours(
        renormalise=Renormalise.ALWAYS,  # build_moe_ffn(..., norm_w = true) in models/llama.cpp
        sliding_window=False,  # models/llama.cpp has no sliding-window attention (Mistral's window is ignored)
        rope_types=LLAMACPP_ROPE,  # llama3's frequency factors: conversion/llama.py generate_extra_tensors
        read_from="llama.cpp src/models/llama.cpp, conversion/llama.py"),
    (Engine.LLAMACPP, "qwen2_moe"): Honours(
        renormalise=Renormalise.NEVER,  # qwen2moe.cpp calls build_moe_ffn with norm_w = false
        dense_layers=False,  # a router in every layer; the converter cannot map a dense FFN's tensors
        tied_embeddings=False,  # output.weight is required; conversion/qwen.py writes none for tied embeddings
        head_dim=False,  # create_tensor_qkv(..., n_embd, n_embd, ...): q is n_embd x n_embd
        sliding_window=False,  # no sliding-window attention in qwen2moe.cpp
        shared_gate_at_zero=False,  # sigmoid computed as silu(x) / x: 0/0 = NaN at x = 0
        shared_width_zero=False,  # every layer needs a shared expert; width 0 falls back to n_ff
        rope_types=LLAMACPP_ROPE - {"llama3"},  # ggml_rope_ext(..., nullptr): no frequency factors
        read_from="llama.cpp src/models/qwen2moe.cpp, conversion/qwen.py"),
    (Engine.LLAMACPP, "qwen3_moe"): Honours(
        renormalise=Renormalise.ALWAYS,  # qwen3moe.cpp: norm_w = true, norm_topk_prob is not read
        dense_layers=False,  # a router in every layer
        sliding_window=False,
        rope_types=LLAMACPP_ROPE - {"llama3"},  # as qwen2moe.cpp: no frequency factors
        read_from="llama.cpp src/models/qwen3moe.cpp, conversion/qwen.py"),
    (Engine.LLAMACPP, "granitemoe"): Honours(
        renormalise=Renormalise.ALWAYS,  # models/granite.cpp: build_moe_ffn(..., norm_w = true)
        read_from="llama.cpp src/models/granite-moe.cpp, granite.cpp, conversion/granite.py"),
    (Engine.LLAMACPP, "granitemoeshared"): Honours(
        renormalise=Renormalise.ALWAYS,  # the shared MLP is added ungated (ffn_*_shexp in models/granite.cpp)
        read_from="llama.cpp src/models/granite-moe.cpp, granite.cpp, conversion/granite.py"),
    (Engine.LLAMACPP, REMOTE): Honours(runs=False, read_from="llama.cpp has no architecture for moeify's code"),
    (Engine.VLLM, "mixtral"): Honours(
        renormalise=Renormalise.ALWAYS,  # FusedMoE(renormalize=True)
        sliding_window=False,  # MixtralAttention builds Attention without a sliding window
        read_from="vLLM models/mixtral.py"),
    (Engine.VLLM, "qwen2_moe"): Honours(
        qkv_bias=QkvBias.ALWAYS,  # Qwen2MoeAttention: QKVParallelLinear(bias=True); missing weights fail the load
        head_dim=False,  # head_dim = hidden_size // num_heads
        sliding_window=False,
        read_from="vLLM models/qwen2_moe.py"),
    (Engine.VLLM, "qwen3_moe"): Honours(sliding_window=False, read_from="vLLM models/qwen3_moe.py"),
    (Engine.VLLM, "granitemoe"): Honours(
        renormalise=Renormalise.ALWAYS,  # FusedMoE(renormalize=True)
        qkv_bias=QkvBias.NEVER,  # GraniteMoeAttention: QKVParallelLinear(bias=False)
        head_dim=False,  # head_dim = hidden_size // num_heads (Granite has no head_dim field)
        read_from="vLLM models/granitemoe.py"),
    (Engine.VLLM, "granitemoeshared"): Honours(
        renormalise=Renormalise.ALWAYS, qkv_bias=QkvBias.NEVER, head_dim=False,  # granitemoe.py's attention and MoE
        read_from="vLLM models/granitemoeshared.py, granitemoe.py"),
    (Engine.VLLM, REMOTE): Honours(runs=False, read_from="vLLM has no implementation of moeify's code"),
}


@dataclass(frozen=True)
class Verdict:
    engine: Engine
    exact: bool
    reason: str = ""  # why not, when not exact ("qwen2_moe: has no dense layers (mlp_only_layers)")
    remedy: str = ""  # what would run exactly instead, when something would

    def line(self) -> str:
        if self.exact:
            return f"{NAMES[self.engine]} ✓" + (" (from its code)" if self.engine is Engine.VLLM else "")
        return f"{NAMES[self.engine]} ✗ ({self.reason}" + (f"; would with {self.remedy})" if self.remedy else ")")

    def to_dict(self) -> dict:
        return {"exact": self.exact, **({"reason": self.reason} if self.reason else {}),
                **({"remedy": self.remedy} if self.remedy else {})}


def scope(engine: Engine) -> tuple[Engine, ...]:
    """The engines an output for `--engine engine` must run in exactly (transformers always)."""
    return CONCRETE if engine is Engine.ANY else tuple(dict.fromkeys((Engine.TRANSFORMERS, engine)))


def honours(engine: Engine, arch: str) -> Honours:
    return TABLE.get((engine, arch), Honours(runs=False, read_from=f"no {arch} in {NAMES[engine]}"))


def all_honour(engine: Engine, arch: str, feature: str) -> bool:
    """Whether every engine in the scope of `--engine engine` honours a feature of `arch`."""
    return all(getattr(honours(e, arch), feature) for e in scope(engine))


def verdicts(config: dict, spec: Spec) -> list[Verdict]:
    """transformers, vLLM and llama.cpp on a planned output: exact, or why not and what would be."""
    arch = config.get("model_type", "")
    out = []
    for engine in CONCRETE:
        problems = _problems(honours(engine, arch), arch, config, spec)
        label = "remote format" if arch == REMOTE else arch
        reason = f"{label}: " + ", ".join(p for p, _ in problems) if problems else ""
        remedy = " ".join(dict.fromkeys(r for _, r in problems if r))
        out.append(Verdict(engine, not problems, reason, remedy))
    return out


def require(engine: Engine, found: list[Verdict]) -> None:
    """Refuse in one line (before anything is written) when `--engine` cannot run the output exactly."""
    for verdict in found:
        if verdict.engine is engine and not verdict.exact:
            instead = f"it would with {verdict.remedy}" if verdict.remedy else \
                "--engine any writes it anyway and says where it runs"
            raise MoeifyError(f"--engine {engine.value}: {NAMES[engine]} would not compute this output exactly "
                              f"({verdict.reason}); {instead}")


def line(found: list[Verdict]) -> str:
    """One line for the summary and the card: 'transformers ✓, vLLM ✓ (from its code), llama.cpp ✗ ...'."""
    return ", ".join(v.line() for v in found)


def from_record(recorded: dict) -> list[Verdict]:
    """The verdicts as moeify.json records them ({engine: {exact, reason, remedy}})."""
    return [Verdict(Engine(name), bool(v.get("exact")), v.get("reason", ""), v.get("remedy", ""))
            for name, v in recorded.items() if name in {e.value for e in CONCRETE} and isinstance(v, dict)]


# ---------------------------------------------------------------------------- what a config uses


def _problems(h: Honours, arch: str, config: dict, spec: Spec) -> list[tuple[str, str]]:
    """(what the engine computes differently, what would work) for each feature it does not honour."""
    if not h.runs:
        return [("no implementation of its code" if arch == REMOTE else "no implementation",
                 "a native format (drop --format remote)" if spec.format is Format.REMOTE else "")]
    found = []
    wanted = renormalised(arch, config)
    if wanted is not None and _top_k(config) < _experts(config):  # with every expert chosen, sums are 1 anyway
        if h.renormalise is Renormalise.NEVER and wanted:
            found.append(("never renormalises top-k weights (ignores norm_topk_prob)", _uniform_hint(spec)))
        if h.renormalise is Renormalise.ALWAYS and not wanted:
            found.append(("always renormalises top-k weights (ignores norm_topk_prob)", ""))
    if not h.dense_layers and dense_layers(config):
        found.append(("has no dense layers (mlp_only_layers)", "--moe-layers all"))
    if not h.tied_embeddings and config.get("tie_word_embeddings"):
        found.append(("needs an lm_head.weight, and the embeddings are tied", ""))
    if not h.shared_width_zero and arch == "qwen2_moe" and not config.get("shared_expert_intermediate_size"):
        found.append(("needs a shared expert in every layer", ""))
    if h.qkv_bias is QkvBias.ALWAYS and not _qkv_bias(arch, config):
        found.append(("always has q/k/v biases, which this checkpoint lacks", ""))
    if h.qkv_bias is QkvBias.NEVER and _qkv_bias(arch, config):
        found.append(("has no attention biases (attention_bias)", ""))
    head_dim, derived = config.get("head_dim"), _derived_head_dim(config)
    if not h.head_dim and head_dim and head_dim != derived:
        found.append((f"assumes head_dim = hidden_size / heads = {derived}, not {head_dim}", ""))
    rope = rope_type(config)
    if h.rope_types is not None and rope not in h.rope_types:
        found.append((f"ignores {rope} rope scaling", ""))
    window = sliding_window(config)
    if not h.sliding_window and window:
        found.append((f"ignores the {window}-token sliding window: the same only within it", ""))
    return found


def renormalised(arch: str, config: dict) -> bool | None:
    """Whether transformers renormalises this config's top-k weights (None: not a routed MoE)."""
    if arch in ("mixtral", "granitemoe", "granitemoeshared"):  # softmax over the top-k logits: renormalised
        return True
    if arch in ("qwen2_moe", "qwen3_moe"):
        return bool(config.get("norm_topk_prob"))
    return None


def dense_layers(config: dict) -> bool:
    """Whether some decoder layer keeps a dense FFN (Qwen-MoE's mlp_only_layers, decoder_sparse_step)."""
    return bool(config.get("mlp_only_layers")) or int(config.get("decoder_sparse_step") or 1) > 1


def rope_type(config: dict) -> str:
    """The config's rope scaling type ("default" without scaling)."""
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    params = params.get("full_attention", params) if isinstance(params, dict) else {}
    return str(params.get("rope_type") or params.get("type") or "default")


def sliding_window(config: dict) -> int | None:
    """The attention window transformers applies to some layer of this config, if any."""
    window = config.get("sliding_window")
    if not window:
        return None
    types = config.get("layer_types")
    if types is not None:
        return window if "sliding_attention" in types else None
    return window if config.get("use_sliding_window", True) else None


def _qkv_bias(arch: str, config: dict) -> bool:
    return bool(config.get("qkv_bias") if arch == "qwen2_moe" else config.get("attention_bias"))


def _derived_head_dim(config: dict) -> int:
    return int(config.get("hidden_size", 0)) // max(int(config.get("num_attention_heads", 1)), 1)


def _top_k(config: dict) -> int:
    return int(config.get("num_experts_per_tok") or 0)


def _experts(config: dict) -> int:
    return int(config.get("num_local_experts") or config.get("num_experts") or 0)


def _uniform_hint(spec: Spec) -> str:
    """An upcycle with a zero router and whole copies is exact without renormalising (uniform k/E weights)."""
    if spec.mode is not Mode.UPCYCLE:
        return ""
    flags = [flag for flag, needed in (("--router-init zeros", spec.router_init is not RouterInit.ZEROS),
                                       ("--granularity 1", spec.granularity > 1)) if needed]
    return " ".join(flags) if flags else ""
