"""The remote format: the source family's own transformers model with moeify MoE blocks as FFNs.

It holds every family and every conversion: attention, norms and embeddings keep the source's
tensor names and code, and the checkpoint carries configuration_moeify.py and modeling_moeify.py
(loaded with trust_remote_code=True). Dense layers keep their FFN untouched.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from moeify.adapters import Adapter
from moeify.spec import Spec
from moeify.targets.base import NOT_BACKBONE, PROJ_NAMES, LayerTensor, Target, dtype_name, ffn_tensors

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig

    from moeify.transforms import FFN, MoELayer

CODE_DIR = Path(__file__).parent / "remote_code"
CODE_FILES = ("configuration_moeify.py", "modeling_moeify.py")

# base_config keeps model_type (it picks the family's classes) and states the output dtype itself.
NOT_BASE = NOT_BACKBONE - {"model_type"}


class Remote(Target):
    name = "remote"

    def refusal(self, adapter: Adapter, config: dict, spec: Spec, moe_layers: list[int]) -> str | None:
        return None  # its MoE block has every option moeify uses

    def moe_tensors(self, adapter: Adapter, layer: int, moe: MoELayer) -> list[LayerTensor]:
        base = adapter.mlp_path(layer)
        tensors: list[LayerTensor] = [(f"{base}.router.weight", lambda m: m.router)]
        if getattr(moe, "selection_bias", None) is not None:  # (E,) float32: top-k selection only (expand)
            tensors.append((f"{base}.router.expert_bias", lambda m: m.selection_bias))
        for j in range(len(moe.experts)):
            tensors += _ffn_tensors(f"{base}.experts.{j}", moe.experts[0], lambda m, j=j: m.experts[j])
        for s in range(len(moe.shared)):
            tensors += _ffn_tensors(f"{base}.shared_experts.{s}", moe.shared[0], lambda m, s=s: m.shared[s])
        if moe.output_bias is not None:
            tensors.append((f"{base}.output_bias", lambda m: m.output_bias))
        return tensors

    def config(self, adapter: Adapter, config: dict, spec: Spec, moe_layers: list[int], moe: MoELayer,
               dtype: torch.dtype) -> PretrainedConfig:
        from transformers import AutoConfig

        from moeify.targets.remote_code.configuration_moeify import MoeifyConfig

        base = {k: v for k, v in AutoConfig.for_model(**config).to_dict().items() if k not in NOT_BASE}
        base["dtype"] = dtype_name(dtype)
        expert = moe.experts[0]
        block = {
            "mlp_path": adapter.mlp,
            "moe_layers": list(moe_layers),
            "num_experts": len(moe.experts),
            "num_experts_per_tok": moe.topk,
            "expert_intermediate_size": expert.intermediate_size,
            "num_shared_experts": len(moe.shared),
            "shared_intermediate_size": moe.shared[0].intermediate_size if moe.shared else expert.intermediate_size,
            "hidden_act": adapter.activation(config),
            "gated": adapter.gated,
            "bias": adapter.bias,
            "output_bias": moe.output_bias is not None,
            "scoring": moe.scoring.value,
            "norm_topk_prob": True,  # upcycled copies are exact only when the top-k weights sum to 1
        }
        out = MoeifyConfig(base_config=base, moe=block, dtype=dtype_name(dtype))
        out.architectures = ["MoeifyForCausalLM"]
        out.auto_map = {"AutoConfig": "configuration_moeify.MoeifyConfig",
                        "AutoModelForCausalLM": "modeling_moeify.MoeifyForCausalLM"}
        return out

    def write_code(self, folder: Path) -> None:
        for name in CODE_FILES:
            shutil.copy2(CODE_DIR / name, Path(folder) / name)


def _ffn_tensors(prefix: str, example: FFN, pick) -> list[LayerTensor]:
    """Names of one expert's present weights and biases, in a fixed order."""
    return ffn_tensors(prefix, {role: PROJ_NAMES[role] for role in example.tensors()}, pick)
