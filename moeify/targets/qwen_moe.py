"""Native Qwen2-MoE and Qwen3-MoE: softmax top-k routing, any subset of MoE layers.

Qwen2-MoE also holds shared experts, as ONE shared expert behind a sigmoid gate. moeify's
shared experts are always on with weight 1, so the S shared experts are concatenated along
their intermediate neurons (one expert of width S*I computes their sum), the gate is written
as zeros (sigmoid(0) = 0.5 for every token) and the shared down projection is doubled.
Without shared experts the shared expert has width 0 and contributes nothing.
"""

from __future__ import annotations

import torch
from transformers import PretrainedConfig, Qwen2MoeConfig, Qwen3MoeConfig

from moeify.adapters import Adapter
from moeify.moe_source import MoESource
from moeify.spec import Mode, Spec
from moeify.targets.base import WEIGHT_NAMES, LayerTensor, Target, backbone, dtype_name, ffn_tensors, routed_tensors
from moeify.transforms import FFN, MoELayer

# sigmoid(0) of the zero shared-expert gate; the doubled down projection undoes it.
SHARED_GATE_AT_ZERO = 0.5


class QwenMoE(Target):
    """What Qwen2-MoE and Qwen3-MoE share: names, layer subsets, routing."""

    config_class: type[PretrainedConfig]

    def refusal(self, adapter: Adapter, config: dict, spec: Spec, moe_layers: list[int]) -> str | None:
        if self.name not in adapter.native:
            return f"{self.name} cannot hold {adapter.model_type}'s layers exactly"
        if adapter.bias:
            return f"{self.name} has no FFN biases"
        if spec.mode is not Mode.UPCYCLE:
            if isinstance(adapter, MoESource):  # its own format, every expert cut into virtual groups: exact
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
        out = self.config_class(**fields)
        out.architectures = [self.config_class.__name__.replace("Config", "ForCausalLM")]
        return out

    def extra_fields(self, config: dict, moe: MoELayer, num_layers: int) -> dict:
        return {}


class Qwen2Moe(QwenMoE):
    name = "qwen2_moe"
    config_class = Qwen2MoeConfig

    def backbone_refusal(self, config: dict, spec: Spec) -> str | None:
        if config.get("attention_bias"):
            return "Qwen2-MoE has biases on q/k/v only, not on the attention output"
        return None

    def moe_tensors(self, adapter: Adapter, layer: int, moe: MoELayer) -> list[LayerTensor]:
        if isinstance(adapter, MoESource):  # a split Qwen2-MoE: its gated shared expert passes through
            return super().moe_tensors(adapter, layer, moe)
        base = f"model.layers.{layer}.mlp"
        return [
            *super().moe_tensors(adapter, layer, moe),
            *ffn_tensors(f"{base}.shared_expert", WEIGHT_NAMES, shared_expert),
            (f"{base}.shared_expert_gate.weight", lambda m: m.router.new_zeros(1, m.router.shape[1])),
        ]

    def extra_fields(self, config: dict, moe: MoELayer, num_layers: int) -> dict:
        fields = {
            "shared_expert_intermediate_size": sum(s.intermediate_size for s in moe.shared),
            # Qwen2 carries q/k/v biases; Llama and Mistral do not (attention_bias was refused above).
            "qkv_bias": config.get("model_type") == "qwen2",
        }
        if config.get("model_type") == "mistral" and config.get("sliding_window"):
            # Mistral slides its window on every layer; Qwen2-MoE reads that from layer_types.
            fields |= {"use_sliding_window": True, "max_window_layers": num_layers,
                       "layer_types": ["sliding_attention"] * num_layers}
        return fields


class Qwen3Moe(QwenMoE):
    name = "qwen3_moe"
    config_class = Qwen3MoeConfig

    def backbone_refusal(self, config: dict, spec: Spec) -> str | None:
        if spec.shared_experts:
            return "Qwen3-MoE has no shared experts"
        types = backbone(config).get("layer_types") or []
        if config.get("use_sliding_window") and any(t != "sliding_attention" for t in types):
            return "Qwen3-MoE slides its attention window on every layer or none"
        return None


def shared_expert(moe: MoELayer) -> FFN:
    """The shared experts as one always-on FFN of their summed width, scaled for the 0.5 gate.

    gate, up: (S*I, H); down: (H, S*I). Width 0 when there are no shared experts.
    """
    if not moe.shared:
        empty = moe.router.new_zeros(0, moe.router.shape[1])
        return FFN(gate=empty, up=empty, down=empty.T)
    return FFN(
        gate=torch.cat([s.gate for s in moe.shared], dim=0),
        up=torch.cat([s.up for s in moe.shared], dim=0),
        down=torch.cat([s.down for s in moe.shared], dim=1),
    ).scaled(1 / SHARED_GATE_AT_ZERO)
