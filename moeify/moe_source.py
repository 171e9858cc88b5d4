"""Reading the experts of MoE checkpoints, so a split can cut every expert into finer ones.

A `MoESource` answers what the conversion asks of a dense `Adapter` (which tensors a layer's
FFN is made of, how to read it, which native targets hold it), but reads a whole MoE layer:
router and experts. The conversion pass stays the same single streaming pass.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from moeify.checkpoint import Checkpoint
from moeify.transforms import FFN, MoELayer


@dataclass(frozen=True)
class MoESource:
    model_type: str
    native: tuple[str, ...]  # native targets that hold a split of it exactly (virtual groups)
    mlp: str  # the MoE block's path
    router: str  # under the block
    expert: str  # one expert's module under the block, {j} its index
    roles: tuple[tuple[str, str], ...]  # (FFN role, projection name) of an expert
    experts_field: str
    topk_field: str = "num_experts_per_tok"
    layers_field: str = "num_hidden_layers"
    hidden_field: str = "hidden_size"
    activation_field: str = "hidden_act"
    gated: bool = True
    bias: bool = False
    count: int = 0  # experts per layer, read from the checkpoint's config by moe_source_for

    def mlp_path(self, layer: int) -> str:
        return self.mlp.format(i=layer)

    def num_layers(self, config: dict) -> int:
        return int(config[self.layers_field])

    def num_experts(self, config: dict) -> int:
        return int(config[self.experts_field])

    def topk(self, config: dict) -> int:
        return int(config[self.topk_field])

    def activation(self, config: dict) -> str:
        return config.get(self.activation_field, "silu")

    def ffn_names(self, layer: int) -> dict[str, str]:
        """Tensor names of one MoE layer: the router first, then every expert's projections."""
        base = self.mlp_path(layer)
        names = {"router": f"{base}.{self.router}"}
        for j in range(self.count):
            names |= {f"{j}.{role}": f"{base}.{self.expert.format(j=j)}.{proj}.weight" for role, proj in self.roles}
        return names

    def read_ffn(self, ckpt: Checkpoint, layer: int, meta: bool = False) -> MoELayer:
        """One MoE layer (router (E, H), experts in nn.Linear layout); with meta=True, shapes only."""
        load = ckpt.meta if meta else ckpt.read
        names = self.ffn_names(layer)
        experts = [FFN(**{role: load(names[f"{j}.{role}"]) for role, _ in self.roles}) for j in range(self.count)]
        return MoELayer(experts=experts, router=load(names["router"]), topk=self.topk(ckpt.config))


MOE_SOURCES: dict[str, MoESource] = {
    s.model_type: s
    for s in (
        MoESource("mixtral", native=("mixtral",), mlp="model.layers.{i}.block_sparse_moe", router="gate.weight",
                  expert="experts.{j}", roles=(("gate", "w1"), ("up", "w3"), ("down", "w2")),
                  experts_field="num_local_experts"),
    )
}


def moe_source_for(config: dict) -> MoESource | None:
    """The reader of a MoE source's experts, bound to its expert count; None for a dense source."""
    source = MOE_SOURCES.get(config.get("model_type"))
    return replace(source, count=source.num_experts(config)) if source is not None else None
