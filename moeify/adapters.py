"""One declarative entry per dense family: where its FFN lives and how its tensors are laid out.

Code appears only where a tensor really changes shape (fused or transposed layouts).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, ClassVar

from moeify.errors import MoeifyError

if TYPE_CHECKING:  # torch and transformers load only when tensors are read: `moeify inspect` stays instant
    from collections.abc import Callable

    import torch

    from moeify.checkpoint import Checkpoint
    from moeify.transforms import FFN


@dataclass(frozen=True)
class Adapter:
    moe: ClassVar[bool] = False  # a dense family (moe_source.MoESource says True)
    model_type: str
    native: tuple[str, ...]  # native MoE targets that can hold this family, by preference
    mlp: str = "model.layers.{i}.mlp"  # the FFN module's path
    gate: str | None = "gate_proj"  # None: a plain (non-gated) FFN
    up: str = "up_proj"
    down: str = "down_proj"
    fused_gate_up: bool = False  # one (2I, H) tensor named `up`, gate rows first (phi3)
    transposed: bool = False  # Conv1D layout (in, out) instead of nn.Linear's (out, in)
    bias: bool = False  # projections carry biases
    bias_field: str | None = None  # config flag that adds biases to every projection (llama's mlp_bias)
    activation_field: str = "hidden_act"
    layers_field: str = "num_hidden_layers"
    hidden_field: str = "hidden_size"
    # Checkpoint names the family's transformers class renames or ignores on load (legacy layouts):
    # (regex, replacement), a None replacement drops the tensor. Applied before anything else.
    renames: tuple[tuple[str, str | None], ...] = ()

    def loaded_name(self, name: str) -> str | None:
        """A checkpoint name as the family's model has it in memory; None for a tensor it ignores."""
        for pattern, replacement in self.renames:
            if re.search(pattern, name):
                if replacement is None:
                    return None
                name = re.sub(pattern, replacement, name)
        return name

    def loaded(self, ckpt: Checkpoint) -> Checkpoint:
        """The checkpoint seen under in-memory names (the same object when no name changes)."""
        if not self.renames:
            return ckpt
        view = copy.copy(ckpt)  # shares the parsed headers; only the name -> location map differs
        view.tensors = {new: info for name, info in ckpt.tensors.items()
                        if (new := self.loaded_name(name)) is not None}
        return view

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
        import torch

        from moeify.transforms import FFN

        load = ckpt.meta if meta else ckpt.read
        tensors = {role: load(name) for role, name in self.ffn_names(layer).items()}
        if self.transposed:
            tensors = {role: t.T if t.ndim == 2 else t for role, t in tensors.items()}
        if self.fused_gate_up:
            tensors["gate"], tensors["up"] = torch.chunk(tensors["up"], 2, dim=0)
        return FFN(**tensors)

    def num_layers(self, config: dict) -> int:
        try:
            return int(config[self.layers_field])
        except (KeyError, TypeError, ValueError):
            raise MoeifyError(f"config.json lacks a valid {self.layers_field!r}; fix or re-download it") from None

    def activation(self, config: dict) -> str:
        """The transformers ACT2FN key; a config that omits it means the family's default."""
        if config.get(self.activation_field):
            return config[self.activation_field]
        from transformers import AutoConfig

        return getattr(AutoConfig.for_model(self.model_type), self.activation_field)

    def activation_fn(self, config: dict) -> Callable[[torch.Tensor], torch.Tensor]:
        """The FFN's activation as a function, as the family's modeling code applies it."""
        from transformers.activations import ACT2FN

        return ACT2FN[self.activation(config)]

    @property
    def gated(self) -> bool:
        return self.gate is not None


ADAPTERS: dict[str, Adapter] = {
    a.model_type: a
    for a in (
        Adapter("llama", native=("mixtral", "qwen2_moe"), bias_field="mlp_bias"),
        Adapter("mistral", native=("mixtral", "qwen2_moe")),
        Adapter("qwen2", native=("qwen2_moe",)),
        Adapter("qwen3", native=("qwen3_moe",)),
        Adapter("gemma2", native=(), activation_field="hidden_activation"),
        Adapter("gemma3_text", native=(), activation_field="hidden_activation"),
        Adapter("phi3", native=(), up="gate_up_proj", fused_gate_up=True),
        Adapter("olmo2", native=()),
        Adapter("granite", native=("granitemoe", "granitemoeshared"), bias_field="mlp_bias"),
        # Conv1D stores (in, out); the FFN is up then GELU then down, both with biases.
        Adapter("gpt2", native=(), mlp="transformer.h.{i}.mlp", gate=None, up="c_fc", down="c_proj",
                transposed=True, bias=True, activation_field="activation_function", layers_field="n_layer",
                hidden_field="n_embd",
                # OpenAI's checkpoints were saved from GPT2Model (no prefix) with causal-mask buffers.
                renames=((r"\.attn\.(masked_)?bias$", None), (r"^(?!transformer\.|lm_head\.)", "transformer."))),
        Adapter("gpt_neox", native=(), mlp="gpt_neox.layers.{i}.mlp", gate=None, up="dense_h_to_4h",
                down="dense_4h_to_h", bias=True, renames=((r"^embed_out\.", "lm_head."),)),
    )
}


def adapter_for(config: dict) -> Adapter:
    """The adapter of a source config, or an error naming the supported families."""
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in ADAPTERS:
        from moeify.moe_source import MOE_SOURCES  # only on this error path: it imports transformers

        if model_type in MOE_SOURCES:  # the next step, not a dead end
            raise MoeifyError(f"this {model_type} checkpoint is already a MoE: `moeify split` cuts its experts "
                              f"finer, `moeify expand` adds experts")
        supported = ", ".join(sorted(ADAPTERS))
        raise MoeifyError(f"architecture {model_type!r} is not supported; supported families: {supported}")
    adapter = ADAPTERS[model_type]
    if adapter.bias_field and config.get(adapter.bias_field):
        adapter = replace(adapter, bias=True)
    return adapter
