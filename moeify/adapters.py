"""One declarative entry per dense family: where its FFN lives and how its tensors are laid out.

Code appears only where a tensor really changes shape (fused or transposed layouts).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeify.checkpoint import Checkpoint
from moeify.errors import MoeifyError
from moeify.transforms import FFN


@dataclass(frozen=True)
class Adapter:
    model_type: str
    native: tuple[str, ...]  # native MoE targets that hold this family losslessly
    mlp: str = "model.layers.{i}.mlp"  # the FFN module's path
    gate: str | None = "gate_proj"  # None: a plain (non-gated) FFN
    up: str = "up_proj"
    down: str = "down_proj"
    fused_gate_up: bool = False  # one (2I, H) tensor named `up`, gate rows first (phi3)
    transposed: bool = False  # Conv1D layout (in, out) instead of nn.Linear's (out, in)
    bias: bool = False  # projections carry biases
    activation_field: str = "hidden_act"
    layers_field: str = "num_hidden_layers"
    hidden_field: str = "hidden_size"

    def mlp_path(self, layer: int) -> str:
        return self.mlp.format(i=layer)

    def ffn_names(self, layer: int) -> dict[str, str]:
        """Checkpoint tensor names of one layer's FFN, by role."""
        base = self.mlp_path(layer)
        projections = {"up": self.up, "down": self.down}
        if self.gate and not self.fused_gate_up:
            projections["gate"] = self.gate
        names = {role: f"{base}.{proj}.weight" for role, proj in projections.items()}
        if self.bias:
            names |= {f"{role}_bias": f"{base}.{proj}.bias" for role, proj in projections.items()}
        return names

    def read_ffn(self, ckpt: Checkpoint, layer: int, meta: bool = False) -> FFN:
        """One layer's FFN in nn.Linear layout; with meta=True, shapes only."""
        load = ckpt.meta if meta else ckpt.read
        tensors = {role: load(name) for role, name in self.ffn_names(layer).items()}
        if self.transposed:
            tensors = {role: t.T if t.ndim == 2 else t for role, t in tensors.items()}
        if self.fused_gate_up:
            tensors["gate"], tensors["up"] = torch.chunk(tensors["up"], 2, dim=0)
        return FFN(**tensors)

    def num_layers(self, config: dict) -> int:
        return int(config[self.layers_field])

    def activation(self, config: dict) -> str:
        return config.get(self.activation_field, "silu")


ADAPTERS: dict[str, Adapter] = {
    a.model_type: a
    for a in (
        Adapter("llama", native=("mixtral",)),
        Adapter("mistral", native=("mixtral",)),
    )
}


def adapter_for(config: dict) -> Adapter:
    """The adapter of a source config, or an error naming the supported families."""
    model_type = config.get("model_type")
    if model_type not in ADAPTERS:
        supported = ", ".join(sorted(ADAPTERS))
        raise MoeifyError(f"architecture {model_type!r} is not supported; supported families: {supported}")
    return ADAPTERS[model_type]
