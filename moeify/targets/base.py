"""What every output format answers: can it hold this conversion, and how is it named on disk.

Targets import neither torch nor transformers at module level: `moeify inspect` asks them which
format would hold a conversion, and that is arithmetic on config.json (see test_instant_cli).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from moeify.adapters import Adapter
from moeify.spec import Spec

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig

    from moeify.transforms import FFN, MoELayer

# One output tensor of a MoE layer: its name, and how to take it from the built layer.
LayerTensor = tuple[str, Callable[["MoELayer"], "torch.Tensor"]]
# An output tensor the source lacks: its name, the source tensor it derives from, and how
# (the function also runs on meta tensors, for the plan).
Derived = tuple[str, str, Callable[["torch.Tensor"], "torch.Tensor"]]

# Source config keys that describe the source file, not the model.
NOT_BACKBONE = {"architectures", "model_type", "auto_map", "transformers_version", "_name_or_path",
                "_model_name_or_path", "quantization_config", "torch_dtype", "dtype"}


class Target:
    name: str

    def refusal(self, adapter: Adapter, config: dict, spec: Spec, moe_layers: list[int]) -> str | None:
        """Why this format cannot hold the conversion losslessly, or None when it can."""
        raise NotImplementedError

    def prepared(self, adapter: Adapter, config: dict, spec: Spec) -> Target:
        """This target, set up for one request (the construction it chose); most need nothing."""
        return self

    def rename(self, name: str) -> str:
        """The output name of a tensor passed through unchanged."""
        return name

    def added_tensors(self, names: list[str]) -> list[Derived]:
        """Tensors the format needs that the source (with these tensor names) lacks."""
        return []

    def added_params(self, config: dict, moe_layers: list[int]) -> int:
        """Parameters added_tensors and the construction add to the source's and the MoE blocks' (inspect)."""
        return 0

    def adjusted(self, moe: MoELayer) -> MoELayer:
        """A built MoE layer as this format computes it (the same, unless a construction rescales it)."""
        return moe

    def moe_tensors(self, adapter: Adapter, layer: int, moe: MoELayer) -> list[LayerTensor]:
        """Output names of one MoE layer, in writing order (moe may hold meta tensors)."""
        raise NotImplementedError

    def config(self, adapter: Adapter, config: dict, spec: Spec, moe_layers: list[int], moe: MoELayer,
               dtype: torch.dtype) -> PretrainedConfig:
        """The output config; moe is the first MoE layer on meta tensors (its shapes hold for every layer)."""
        raise NotImplementedError

    def write_code(self, folder: Path) -> None:
        """Files besides weights and config that the format needs (remote code)."""


def backbone(config: dict) -> dict:
    """Every field of the source config that describes the model, normalised by transformers.

    Loading through AutoConfig turns legacy fields (rope_theta, rope_scaling) into the current
    ones, so the target config states them explicitly instead of falling back to its defaults.
    """
    from transformers import AutoConfig

    normalised = AutoConfig.for_model(**config).to_dict()
    return {k: v for k, v in normalised.items() if k not in NOT_BACKBONE}


# nn.Linear names of an FFN's projections (Llama, Qwen, moeify's remote experts), by FFN role.
PROJ_NAMES = {
    "gate": "gate_proj.weight", "up": "up_proj.weight", "down": "down_proj.weight",
    "gate_bias": "gate_proj.bias", "up_bias": "up_proj.bias", "down_bias": "down_proj.bias",
}
WEIGHT_NAMES = {role: PROJ_NAMES[role] for role in ("gate", "up", "down")}


def ffn_tensors(prefix: str, names: dict[str, str], pick: Callable[[MoELayer], FFN]) -> list[LayerTensor]:
    """One expert's tensors, `{prefix}.{name}` for each FFN role in `names` (role -> name on disk), in that order."""
    return [(f"{prefix}.{name}", lambda m, role=role: getattr(pick(m), role)) for role, name in names.items()]


def routed_tensors(block: str, moe: MoELayer, names: dict[str, str]) -> list[LayerTensor]:
    """A router at `{block}.gate.weight`, then every expert under `{block}.experts.{j}` (Mixtral, Qwen-MoE)."""
    tensors: list[LayerTensor] = [(f"{block}.gate.weight", lambda m: m.router)]
    for j in range(len(moe.experts)):
        tensors += ffn_tensors(f"{block}.experts.{j}", names, lambda m, j=j: m.experts[j])
    return tensors


def config_class(name: str) -> type[PretrainedConfig]:
    """transformers' config class of this name, imported when a conversion writes its config."""
    import transformers

    return getattr(transformers, name)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
