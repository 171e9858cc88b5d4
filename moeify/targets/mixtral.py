"""Native Mixtral: routed experts only, every layer MoE, softmax-then-renormalised top-k."""

from __future__ import annotations

from typing import TYPE_CHECKING

from moeify.adapters import Adapter
from moeify.spec import Mode, Spec
from moeify.targets.base import LayerTensor, Target, backbone, config_class, dtype_name, routed_tensors

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig

    from moeify.transforms import MoELayer

# Mixtral's names for an expert's projections, in the order transformers writes them.
EXPERT_NAMES = {"gate": "w1.weight", "down": "w2.weight", "up": "w3.weight"}


class Mixtral(Target):
    name = "mixtral"
    config_name = "MixtralConfig"

    def refusal(self, adapter: Adapter, config: dict, spec: Spec, moe_layers: list[int]) -> str | None:
        if "mixtral" not in adapter.native:
            return f"Mixtral cannot hold {adapter.model_type}'s layers exactly"
        if config.get("attention_bias") or config.get("mlp_bias"):
            return "Mixtral has no attention or FFN biases"
        if spec.shared_experts:
            return "Mixtral has no shared experts"
        if len(moe_layers) != adapter.num_layers(config):
            return "Mixtral makes every layer MoE"
        if spec.mode is Mode.SPLIT and spec.experts == 1:  # splitting experts is virtual groups: exact
            return "Mixtral renormalises top-k weights, which a split cannot match exactly"
        return None

    def moe_tensors(self, adapter: Adapter, layer: int, moe: MoELayer) -> list[LayerTensor]:
        return routed_tensors(f"model.layers.{layer}.block_sparse_moe", moe, EXPERT_NAMES)

    def config(self, adapter: Adapter, config: dict, spec: Spec, moe_layers: list[int], moe: MoELayer,
               dtype: torch.dtype) -> PretrainedConfig:
        fields = backbone(config) | {
            "intermediate_size": moe.experts[0].intermediate_size,
            "num_local_experts": spec.routed_experts,
            "num_experts_per_tok": spec.active_experts,
            "output_router_logits": False,
            "router_jitter_noise": 0.0,
            "dtype": dtype_name(dtype),
        }
        mixtral = config_class(self.config_name)(**fields)
        mixtral.architectures = ["MixtralForCausalLM"]
        return mixtral
