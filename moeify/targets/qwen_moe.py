"""Native Qwen2-MoE and Qwen3-MoE: softmax top-k routing, any subset of MoE layers.

Qwen2-MoE also holds shared experts, as ONE shared expert behind a sigmoid gate. moeify's
shared experts are always on with weight 1, so the S shared experts are concatenated along
their intermediate neurons (one expert of width S*I computes their sum), the gate row is a
negligible constant (sigmoid of a logit near 0 is 0.5 to the last bit) and the shared down
projection is doubled.

How the rest is built depends on the engines the output is for (moeify.engines): llama.cpp's
qwen2moe needs an lm_head.weight, a shared expert in every layer and a non-zero gate logit, and
never renormalises top-k weights; vLLM's always has q/k/v biases. `Construction` holds those
choices; each is exact in transformers too.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from moeify import engines
from moeify.adapters import Adapter
from moeify.anatomy import Fields
from moeify.spec import Mode, RouterInit, Spec
from moeify.targets.base import (
    WEIGHT_NAMES, Derived, LayerTensor, Target, backbone, config_class, dtype_name, ffn_tensors, routed_tensors,
)

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig

    from moeify.transforms import FFN, MoELayer

# sigmoid of the (near) zero shared-expert gate logit; the doubled down projection undoes it.
SHARED_GATE = 0.5
# Every entry of the shared-expert gate row, per dtype: the logit is this times the sum of the
# normalised hidden state, far below where sigmoid leaves 0.5 (|x| < 2^-25 in float32), yet not 0,
# where llama.cpp's silu(x)/x is NaN. float16 cannot hold 2^-60; its smallest subnormal, 2^-24,
# still gives sigmoid 0.5 exactly there, and llama.cpp's converter keeps this tensor in float32
# (FFN_GATE_INP_SHEXP in conversion/base.py), where 2^-24 times the hidden sum is not 0.
GATE_ENTRY = {"float16": 2.0**-24}
GATE_ENTRY_DEFAULT = 2.0**-60
EMBEDDINGS, HEAD = "model.embed_tokens.weight", "lm_head.weight"
QKV = ("q_proj", "k_proj", "v_proj")


@dataclass(frozen=True)
class Construction:
    """Choices that make a Qwen2-MoE output run exactly in the engines it is for."""

    explicit_head: bool = False  # write lm_head.weight (a copy of the embeddings) and untie them
    gate_at_zero: bool = True  # a zero shared-expert gate row; False: a negligible constant (GATE_ENTRY)
    null_shared_width: int = 0  # without shared experts: a zero shared expert this wide (0: none)
    zero_qkv_bias: bool = False  # write zero q/k/v biases the source lacks
    uniform: bool = False  # zero router, no renormalisation, routed down projections x E/k


class QwenMoE(Target):
    """What Qwen2-MoE and Qwen3-MoE share: names, layer subsets, routing."""

    config_name: str  # transformers' config class

    def refusal(self, adapter: Adapter, config: dict, spec: Spec, moe_layers: list[int]) -> str | None:
        if self.name not in adapter.native:
            return f"{self.name} cannot hold {adapter.model_type}'s layers exactly"
        if adapter.bias:
            return f"{self.name} has no FFN biases"
        if spec.mode in (Mode.SPLIT, Mode.EXPAND):  # a merge is upcycle's construction with other FFNs
            if adapter.moe:  # its own format, every expert cut into virtual groups: exact
                return None
            return f"{self.name} renormalises top-k weights, which a split cannot match exactly"
        return self.backbone_refusal(config, spec)

    def backbone_refusal(self, config: dict, spec: Spec) -> str | None:
        raise NotImplementedError

    def moe_tensors(self, adapter: Adapter, layer: int, moe: MoELayer) -> list[LayerTensor]:
        return routed_tensors(f"model.layers.{layer}.mlp", moe, WEIGHT_NAMES)

    def config(self, adapter: Adapter, config: dict, spec: Spec, moe_layers: list[int], moe: MoELayer,
               dtype: torch.dtype) -> PretrainedConfig:
        num_layers = adapter.num_layers(config)
        fields = backbone(config) | {
            "moe_intermediate_size": moe.experts[0].intermediate_size,
            "num_experts": spec.routed_experts,
            "num_experts_per_tok": spec.active_experts,
            "norm_topk_prob": True,  # upcycled experts are exact only when the top-k weights sum to 1
            "decoder_sparse_step": 1,
            "mlp_only_layers": [i for i in range(num_layers) if i not in moe_layers],
            "output_router_logits": False,
            "dtype": dtype_name(dtype),
        } | self.extra_fields(config, moe, num_layers)
        out = config_class(self.config_name)(**fields)
        out.architectures = [self.config_name.replace("Config", "ForCausalLM")]
        return out

    def extra_fields(self, config: dict, moe: MoELayer, num_layers: int) -> dict:
        return {}


class Qwen2Moe(QwenMoE):
    name = "qwen2_moe"
    config_name = "Qwen2MoeConfig"

    def __init__(self, construction: Construction = Construction()):
        self.construction = construction

    def prepared(self, adapter: Adapter, config: dict, spec: Spec) -> Qwen2Moe:
        if adapter.moe:  # a split keeps its source's own construction
            return self
        return Qwen2Moe(construction_for(config, spec))

    def backbone_refusal(self, config: dict, spec: Spec) -> str | None:
        if config.get("attention_bias"):
            return "Qwen2-MoE has biases on q/k/v only, not on the attention output"
        return None

    def adjusted(self, moe: MoELayer) -> MoELayer:
        if not self.construction.uniform:
            return moe
        return uniform(moe)

    def added_tensors(self, names: list[str]) -> list[Derived]:
        added: list[Derived] = []
        if self.construction.explicit_head and HEAD not in names and EMBEDDINGS in names:
            added.append((HEAD, EMBEDDINGS, lambda t: t))
        if self.construction.zero_qkv_bias:
            present = set(names)
            added += [(name[: -len("weight")] + "bias", name, lambda w: w.new_zeros(w.shape[0]))
                      for name in names if name.endswith(tuple(f".{p}.weight" for p in QKV))
                      and name[: -len("weight")] + "bias" not in present]
        return added

    def added_params(self, config: dict, moe_layers: list[int]) -> int:
        c, fields = self.construction, Fields(config)
        hidden, heads = fields.need("hidden_size"), fields.need("num_attention_heads")
        head_dim = fields.get("head_dim") or hidden // heads
        qkv = (heads + 2 * (fields.get("num_key_value_heads") or heads)) * head_dim
        return (fields.need("vocab_size") * hidden * c.explicit_head
                + qkv * fields.need("num_hidden_layers") * c.zero_qkv_bias
                + 3 * hidden * c.null_shared_width * len(moe_layers))

    def moe_tensors(self, adapter: Adapter, layer: int, moe: MoELayer) -> list[LayerTensor]:
        if adapter.moe:  # a split Qwen2-MoE: its gated shared expert passes through
            return super().moe_tensors(adapter, layer, moe)
        base = f"model.layers.{layer}.mlp"
        width = self.construction.null_shared_width
        return [
            *super().moe_tensors(adapter, layer, moe),
            *ffn_tensors(f"{base}.shared_expert", WEIGHT_NAMES, lambda m: shared_expert(m, width)),
            (f"{base}.shared_expert_gate.weight", self.gate_row),
        ]

    def gate_row(self, moe: MoELayer) -> torch.Tensor:
        """(1, H): zeros, or a negligible constant whose logit llama.cpp's sigmoid can take."""
        row = moe.router.new_zeros(1, moe.router.shape[1])
        if self.construction.gate_at_zero:
            return row
        return row + GATE_ENTRY.get(dtype_name(row.dtype), GATE_ENTRY_DEFAULT)

    def config(self, adapter: Adapter, config: dict, spec: Spec, moe_layers: list[int], moe: MoELayer,
               dtype: torch.dtype) -> PretrainedConfig:
        out = super().config(adapter, config, spec, moe_layers, moe, dtype)
        if self.construction.uniform:
            out.norm_topk_prob = False  # uniform weights k/E, undone by the down projections
        if self.construction.explicit_head:
            out.tie_word_embeddings = False
        return out

    def extra_fields(self, config: dict, moe: MoELayer, num_layers: int) -> dict:
        c = self.construction
        fields = {
            "shared_expert_intermediate_size": sum(s.intermediate_size for s in moe.shared) or c.null_shared_width,
            # Qwen2 carries q/k/v biases; Llama and Mistral do not (attention_bias was refused above).
            "qkv_bias": config.get("model_type") == "qwen2" or c.zero_qkv_bias,
        }
        if config.get("model_type") == "mistral" and config.get("sliding_window"):
            # Mistral slides its window on every layer; Qwen2-MoE reads that from layer_types.
            fields |= {"use_sliding_window": True, "max_window_layers": num_layers,
                       "layer_types": ["sliding_attention"] * num_layers}
        return fields


def construction_for(config: dict, spec: Spec) -> Construction:
    """The Qwen2-MoE construction every engine in the scope of spec.engine computes exactly."""
    arch, engine = Qwen2Moe.name, spec.engine
    tied = bool(Fields(config).get("tie_word_embeddings"))  # transformers' default where config.json is silent
    return Construction(
        explicit_head=tied and not engines.all_honour(engine, arch, "tied_embeddings"),
        gate_at_zero=engines.all_honour(engine, arch, "shared_gate_at_zero"),
        # Without shared experts, one zero neuron (adds exactly 0) in every engine: llama.cpp needs a shared
        # expert, and a zero-wide one makes transformers warn about zero-element tensors on every load.
        null_shared_width=0 if spec.shared_experts else 1,
        zero_qkv_bias=config.get("model_type") != "qwen2" and not engines.all_honour(engine, arch, "qkv_bias_optional"),
        # Without renormalisation only uniform routing sums the top-k weights to a constant (k/E);
        # with granularity, ties among equal router rows need not pick whole groups.
        uniform=(spec.router_init is RouterInit.ZEROS and spec.granularity == 1
                 and not engines.all_honour(engine, arch, "renormalises")),
    )


def uniform(moe: MoELayer) -> MoELayer:
    """Routed experts' outputs times E/k: under a zero router each of the k chosen weighs 1/E.

    Identical copies stay one tensor (the writer copies repeats in-kernel).
    """
    from moeify.transforms import LazyExperts

    factor = len(moe.experts) / moe.topk
    if isinstance(moe.experts, LazyExperts):
        experts = LazyExperts(len(moe.experts), lambda j: moe.experts[j].scaled(factor))
    else:
        scaled = {id(e): e.scaled(factor) for e in moe.experts}
        experts = [scaled[id(e)] for e in moe.experts]
    return replace(moe, experts=experts)


class Qwen3Moe(QwenMoE):
    name = "qwen3_moe"
    config_name = "Qwen3MoeConfig"

    def backbone_refusal(self, config: dict, spec: Spec) -> str | None:
        if spec.shared_experts:
            return "Qwen3-MoE has no shared experts"
        if not config.get("use_sliding_window"):  # first: layer_types needs transformers (backbone)
            return None
        if any(t != "sliding_attention" for t in backbone(config).get("layer_types") or []):
            return "Qwen3-MoE slides its attention window on every layer or none"
        return None


def shared_expert(moe: MoELayer, null_width: int = 0) -> FFN:
    """The shared experts as one always-on FFN of their summed width, scaled for the 0.5 gate.

    gate, up: (S*I, H); down: (H, S*I). Without shared experts: zeros of width null_width
    (llama.cpp needs a shared expert in every layer), which add exactly 0.
    """
    import torch

    from moeify.transforms import FFN

    if not moe.shared:
        empty = moe.router.new_zeros(null_width, moe.router.shape[1])
        return FFN(gate=empty, up=empty, down=empty.T)
    return FFN(
        gate=torch.cat([s.gate for s in moe.shared], dim=0),
        up=torch.cat([s.up for s in moe.shared], dim=0),
        down=torch.cat([s.down for s in moe.shared], dim=1),
    ).scaled(1 / SHARED_GATE)
