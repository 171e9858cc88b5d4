"""Native Granite-MoE and Granite-MoE-Shared, for Granite sources: every layer MoE, no FFN biases.

Granite-MoE computes what Granite does around the FFN (embedding, attention, residual and logit
multipliers are the same config fields) and routes like Mixtral: a softmax over the top-k router
logits, i.e. softmax weights renormalised over the top k. Its experts are stored fused, as
transformers' save_pretrained and IBM's checkpoints write them (and llama.cpp's converter and
vLLM read them): per layer, input_linear (E, 2I, H) with each expert's gate rows before its up
rows, output_linear (E, H, I), and router.layer (E, H). Granite-MoE-Shared adds one shared MLP
with weight 1 and no gate, which holds moeify's S shared experts concatenated (width S*I).

The fused tensors hold a whole layer's experts, so writing one takes a layer's experts in
memory (E copies of the FFN), unlike the per-expert formats.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from moeify.adapters import Adapter
from moeify.spec import Mode, Spec
from moeify.targets.base import LayerTensor, Target, backbone, config_class, dtype_name

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig

    from moeify.transforms import FFN, MoELayer


class GraniteMoe(Target):
    name = "granitemoe"
    config_name = "GraniteMoeConfig"

    def refusal(self, adapter: Adapter, config: dict, spec: Spec, moe_layers: list[int]) -> str | None:
        if self.name not in adapter.native:
            return f"{self.name} cannot hold {adapter.model_type}'s layers exactly"
        if adapter.bias:
            return f"{self.name} experts have no biases (mlp_bias)"
        if len(moe_layers) != adapter.num_layers(config):
            return f"{self.name} makes every layer MoE"
        if spec.mode is Mode.SPLIT:
            return f"{self.name} renormalises top-k weights, which a split cannot match exactly"
        return self.shared_refusal(spec)

    def shared_refusal(self, spec: Spec) -> str | None:
        return "Granite-MoE has no shared experts (Granite-MoE-Shared has)" if spec.shared_experts else None

    def moe_tensors(self, adapter: Adapter, layer: int, moe: MoELayer) -> list[LayerTensor]:
        import torch

        base = f"model.layers.{layer}.block_sparse_moe"
        return [
            (f"{base}.router.layer.weight", lambda m: m.router),
            (f"{base}.input_linear.weight", lambda m: torch.stack([gate_up(e) for e in m.experts])),
            (f"{base}.output_linear.weight", lambda m: torch.stack([e.down for e in m.experts])),
        ]

    def config(self, adapter: Adapter, config: dict, spec: Spec, moe_layers: list[int], moe: MoELayer,
               dtype: torch.dtype) -> PretrainedConfig:
        fields = backbone(config) | {
            "intermediate_size": moe.experts[0].intermediate_size,
            "num_local_experts": spec.routed_experts,
            "num_experts_per_tok": spec.active_experts,
            "output_router_logits": False,
            "dtype": dtype_name(dtype),
        } | self.shared_fields(moe)
        fields.pop("mlp_bias", None)  # refused above when true; Granite-MoE has no such field
        out = config_class(self.config_name)(**fields)
        out.architectures = [self.config_name.replace("Config", "ForCausalLM")]
        return out

    def shared_fields(self, moe: MoELayer) -> dict:
        return {}


class GraniteMoeShared(GraniteMoe):
    name = "granitemoeshared"
    config_name = "GraniteMoeSharedConfig"

    def shared_refusal(self, spec: Spec) -> str | None:
        return None if spec.shared_experts else "Granite-MoE holds this without shared experts"

    def moe_tensors(self, adapter: Adapter, layer: int, moe: MoELayer) -> list[LayerTensor]:
        base = f"model.layers.{layer}.shared_mlp"
        return [
            *super().moe_tensors(adapter, layer, moe),
            (f"{base}.input_linear.weight", lambda m: gate_up(shared_mlp(m))),
            (f"{base}.output_linear.weight", lambda m: shared_mlp(m).down),
        ]

    def shared_fields(self, moe: MoELayer) -> dict:
        return {"shared_intermediate_size": sum(s.intermediate_size for s in moe.shared)}


def gate_up(ffn: FFN) -> torch.Tensor:
    """(2I, H): gate rows, then up rows (Granite's input_linear, split in half by chunk(2))."""
    import torch

    return torch.cat([ffn.gate, ffn.up], dim=0)


def shared_mlp(moe: MoELayer) -> FFN:
    """The shared experts as one FFN of their summed width (weight 1 each, as Granite adds it)."""
    import torch

    from moeify.transforms import FFN

    return FFN(gate=torch.cat([s.gate for s in moe.shared]), up=torch.cat([s.up for s in moe.shared]),
               down=torch.cat([s.down for s in moe.shared], dim=1))
