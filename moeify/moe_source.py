"""Reading the experts of MoE checkpoints, so a split can cut every expert into finer ones.

A `MoESource` answers what the conversion asks of a dense `Adapter` (which tensors a layer's
FFN is made of, how to read it, which native targets hold it), but reads a whole MoE layer:
router and routed experts. The conversion pass stays the same single streaming pass. What a
split does not touch (dense layers, Qwen2-MoE's gated shared expert, a moeify checkpoint's
shared experts and output bias) is not named here, so it passes through unchanged, and the
output config is the source's own with the expert count, top-k and expert width rescaled.

Config fields may be dotted paths into nested dicts ("moe.num_experts" in a moeify checkpoint).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import ClassVar

from transformers import AutoConfig, PretrainedConfig

from moeify.checkpoint import Checkpoint
from moeify.errors import MoeifyError
from moeify.transforms import FFN, MoELayer, Scoring
from moeify.validation import transformers_config

GATED = (("gate", "gate_proj.weight"), ("up", "up_proj.weight"), ("down", "down_proj.weight"))
BIASES = (("gate_bias", "gate_proj.bias"), ("up_bias", "up_proj.bias"), ("down_bias", "down_proj.bias"))


def field_of(config: dict, path: str, default=None):
    """config[a][b] for the dotted path "a.b" (default when any part is missing).

    "x|y" names one field spelled x or y (the first present), as transformers versions differ.
    """
    for spelling in path.split("|"):
        value = config
        for part in spelling.split("."):
            if not isinstance(value, dict) or part not in value:
                break
            value = value[part]
        else:
            return value
    return default


def _count(config: dict, path: str) -> int:
    """An integer field (bounded by validation.check_config when config.json was read); one line when absent.

    A field spelled two ways ("num_experts|num_local_experts") must not say two things.
    """
    given = {s: field_of(config, s) for s in path.split("|") if field_of(config, s) is not None}
    if len(set(map(str, given.values()))) > 1:
        said = " and ".join(f"{s}={v}" for s, v in given.items())
        raise MoeifyError(f"config.json gives {said}, one number under two names; keep one")
    value = field_of(config, path)
    if not isinstance(value, int) or isinstance(value, bool):
        raise MoeifyError(f"config.json lacks a valid {path.split('|')[0]!r}; fix or re-download it")
    return value


def _set_field(config: dict, path: str, value) -> None:
    """Set a field under every spelling the config has (the first when it has none)."""
    spellings = path.split("|")
    present = [p for p in spellings if field_of(config, p) is not None] or spellings[:1]
    for spelling in present:
        *parents, leaf = spelling.split(".")
        node = config
        for part in parents:
            node = node[part]
        node[leaf] = value


@dataclass(frozen=True)
class MoESource:
    moe: ClassVar[bool] = True  # what a target asks to tell it from a dense Adapter (which says False)
    model_type: str
    native: tuple[str, ...]  # native targets that hold a split of it exactly (virtual groups); () : remote
    mlp: str  # the MoE block's path
    router: str  # under the block
    expert: str  # one expert's module under the block, {j} its index
    roles: tuple[tuple[str, str], ...]  # (FFN role, tensor name under the expert) of an expert
    experts_field: str
    width_field: str  # an expert's intermediate size
    topk_field: str = "num_experts_per_tok"
    layers_field: str = "num_hidden_layers"
    hidden_field: str = "hidden_size"
    activation_field: str = "hidden_act"
    gated: bool = True
    bias: bool = False
    scoring: Scoring = Scoring.SOFTMAX
    count: int = 0  # experts per layer, read from the checkpoint's config by moe_source_for
    sparse_layers: tuple[int, ...] | None = None  # the layers that are MoE; None: every layer

    def mlp_path(self, layer: int) -> str:
        return self.mlp.replace("{i}", str(layer))  # never str.format: a moeify config's mlp_path is untrusted

    def loaded_name(self, name: str) -> str:
        """MoE checkpoints are read under the names they were saved with."""
        return name

    def num_layers(self, config: dict) -> int:
        return _count(config, self.layers_field)

    def num_experts(self, config: dict) -> int:
        return _count(config, self.experts_field)

    def topk(self, config: dict) -> int:
        return _count(config, self.topk_field)

    def activation(self, config: dict) -> str:
        return field_of(config, self.activation_field, "silu")

    def moe_layers(self, config: dict) -> list[int]:
        """The layers whose FFN is a MoE block (the others are dense and pass through)."""
        layers = range(self.num_layers(config))
        return list(layers) if self.sparse_layers is None else [i for i in layers if i in self.sparse_layers]

    def ffn_names(self, layer: int) -> dict[str, str]:
        """Tensor names of one MoE layer: the router first, then every expert's projections."""
        base = self.mlp_path(layer)
        names = {"router": f"{base}.{self.router}"}
        for j in range(self.count):
            names |= {f"{j}.{role}": f"{base}.{self.expert.format(j=j)}.{name}" for role, name in self.roles}
        return names

    def read_ffn(self, ckpt: Checkpoint, layer: int, meta: bool = False) -> MoELayer:
        """One MoE layer (router (E, H), experts in nn.Linear layout); with meta=True, shapes only."""
        load = ckpt.meta if meta else ckpt.read
        names = self.ffn_names(layer)
        experts = [FFN(**{role: load(names[f"{j}.{role}"]) for role, _ in self.roles}) for j in range(self.count)]
        return MoELayer(experts=experts, router=load(names["router"]), topk=self.topk(ckpt.config),
                        scoring=self.scoring)

    def output_config(self, config: dict, moe: MoELayer, dtype: str) -> PretrainedConfig:
        """The config of an output in this source's own format; moe is its first MoE layer (meta tensors)."""
        return self.split_config(config, experts=len(moe.experts), topk=moe.topk,
                                 width=moe.experts[0].intermediate_size, dtype=dtype)

    def split_config(self, config: dict, experts: int, topk: int, width: int, dtype: str) -> PretrainedConfig:
        """The source's own config with the routed experts' count, top-k and width replaced."""
        fields = copy.deepcopy(config)
        for path, value in ((self.experts_field, experts), (self.topk_field, topk), (self.width_field, width)):
            _set_field(fields, path, value)
        fields["dtype"] = dtype
        fields.pop("torch_dtype", None)
        fields.pop("transformers_version", None)
        if self.model_type == "moeify":
            from moeify.targets.remote_code.configuration_moeify import MoeifyConfig

            fields.pop("model_type", None)
            if isinstance(fields.get("base_config"), dict):
                fields["base_config"] = fields["base_config"] | {"dtype": dtype}
            return MoeifyConfig(**fields)
        return AutoConfig.for_model(fields.pop("model_type"), **fields)


MOE_SOURCES: dict[str, MoESource] = {
    s.model_type: s
    for s in (
        MoESource("mixtral", native=("mixtral",), mlp="model.layers.{i}.block_sparse_moe", router="gate.weight",
                  expert="experts.{j}", roles=(("gate", "w1.weight"), ("up", "w3.weight"), ("down", "w2.weight")),
                  experts_field="num_local_experts", width_field="intermediate_size"),
        MoESource("qwen2_moe", native=("qwen2_moe",), mlp="model.layers.{i}.mlp", router="gate.weight",
                  expert="experts.{j}", roles=GATED, experts_field="num_experts",
                  width_field="moe_intermediate_size"),
        MoESource("qwen3_moe", native=("qwen3_moe",), mlp="model.layers.{i}.mlp", router="gate.weight",
                  expert="experts.{j}", roles=GATED, experts_field="num_experts|num_local_experts",
                  width_field="moe_intermediate_size"),
        MoESource("moeify", native=(), mlp="model.layers.{i}.mlp", router="router.weight", expert="experts.{j}",
                  roles=GATED, experts_field="moe.num_experts", width_field="moe.expert_intermediate_size",
                  topk_field="moe.num_experts_per_tok",
                  layers_field="base_config.num_hidden_layers|base_config.n_layer",  # gpt2 names its own
                  hidden_field="base_config.hidden_size|base_config.n_embd", activation_field="moe.hidden_act"),
    )
}


def moe_source_for(config: dict) -> MoESource | None:
    """The reader of a MoE source's experts, bound to its config; None for a dense source."""
    model_type = config.get("model_type")
    source = MOE_SOURCES.get(model_type) if isinstance(model_type, str) else None
    if source is None:
        return None
    source = replace(source, count=source.num_experts(config))
    if source.model_type in ("qwen2_moe", "qwen3_moe"):
        return replace(source, sparse_layers=tuple(_qwen_sparse_layers(config, source.num_layers(config))))
    if source.model_type == "moeify":
        return _bind_moeify(source, config)
    return source


def _qwen_sparse_layers(config: dict, num_layers: int) -> list[int]:
    """Qwen-MoE's rule: MoE unless in mlp_only_layers, and only every decoder_sparse_step-th layer."""
    step, dense = int(config.get("decoder_sparse_step", 1) or 1), set(config.get("mlp_only_layers") or [])
    return [i for i in range(num_layers) if i not in dense and (i + 1) % step == 0]


def _bind_moeify(source: MoESource, config: dict) -> MoESource:
    """A moeify checkpoint: its block's path, projections and scoring come from its `moe` dict."""
    moe = config.get("moe") or {}
    if not isinstance(config.get("base_config"), dict) or "moe_layers" not in moe:
        raise MoeifyError("this moeify checkpoint's config has no base_config or moe.moe_layers; cannot split it")
    transformers_config(config)  # its config class checks every moe field: one line on a bad one
    if moe.get("aux_free_bias"):
        raise MoeifyError("a moeify checkpoint with aux_free_bias routes with per-expert biases, "
                          "which a split cannot repeat exactly; cannot split it")
    gated, bias = moe.get("gated", True), moe.get("bias", False)
    roles = tuple(r for r in GATED if gated or r[0] != "gate")
    if bias:
        roles += tuple(r for r in BIASES if gated or r[0] != "gate_bias")
    return replace(source, mlp=moe.get("mlp_path", source.mlp), roles=roles, gated=gated, bias=bias,
                   scoring=Scoring(moe.get("scoring", "softmax")),
                   sparse_layers=tuple(int(i) for i in moe["moe_layers"]))
