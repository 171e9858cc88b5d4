"""Configuration of a moeify remote-format checkpoint (copied as-is into every remote output).

A moeify model is a dense family's own transformers model whose chosen FFNs are Mixture-of-Experts
blocks. Its config therefore holds two parts: `base_config`, the source family's full config (a
sub-config, rebuilt through AutoConfig from its `model_type`), and `moe`, a plain dict describing the
blocks. Self-contained: it imports only transformers.
"""

from __future__ import annotations

from transformers import AutoConfig, PretrainedConfig
from transformers.configuration_utils import SubConfigSpec

# Every key of the `moe` dict with its default; a checkpoint may omit any of them.
MOE_DEFAULTS: dict = {
    "mlp_path": "model.layers.{i}.mlp",  # module path, relative to the *ForCausalLM, of the FFN to replace
    "moe_layers": [],  # indices of the layers whose FFN is a MoE block
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "expert_intermediate_size": None,  # None: the base config's intermediate size
    "num_shared_experts": 0,
    "shared_intermediate_size": None,  # None: expert_intermediate_size
    "hidden_act": "silu",  # a transformers ACT2FN key
    "gated": True,  # down(act(gate(x)) * up(x)); False: down(act(up(x)))
    "bias": False,  # experts' projections carry biases
    "output_bias": False,  # one (H,) bias added once to the block output
    "scoring": "softmax",  # "softmax" or "unit" (straight-through weight 1 per selected expert)
    "norm_topk_prob": True,
    "router_aux_loss_coef": 0.01,
    "router_z_loss_coef": 0.0,
    "router_jitter_noise": 0.0,
    "capacity_factor": None,  # None: no token dropping; a float drops overflow tokens in training
    "aux_free_bias": False,  # DeepSeek-V3 balancing: a per-expert bias for selection only
    "aux_free_update_rate": 0.001,
}
SCORINGS = ("softmax", "unit")
MIRRORED_TOKENS = ("bos_token_id", "eos_token_id", "pad_token_id")


class MoeifyConfig(PretrainedConfig):
    """The source family's config plus the MoE description; the family's fields read through.

    `config.vocab_size`, `config.num_hidden_layers` and any other field the moeify config does not set
    itself come from `base_config`, and `get_text_config()` returns `base_config`, which is where
    transformers' generation, cache and embedding code look for the text model's fields.
    """

    model_type = "moeify"
    sub_configs_defaults = {"base_config": SubConfigSpec(config_class=AutoConfig, model_type="llama")}

    base_config: dict | PretrainedConfig | None = None
    moe: dict | None = None
    output_router_logits: bool = False  # return router logits and the aux loss by default
    # Mirrored from base_config: weight tying and the default generation config read them here.
    tie_word_embeddings: bool = False
    bos_token_id: int | list[int] | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.moe = {**MOE_DEFAULTS, **(self.moe or {})}
        self.moe["moe_layers"] = [int(i) for i in self.moe["moe_layers"]]
        if self.moe["expert_intermediate_size"] is None:  # the family's FFN width (gpt2 leaves it implicit: 4H)
            base = self.base_config
            self.moe["expert_intermediate_size"] = getattr(base, "intermediate_size", None) or 4 * base.hidden_size
        if self.moe["scoring"] not in SCORINGS:
            raise ValueError(f"moe.scoring must be one of {SCORINGS}, got {self.moe['scoring']!r}")
        self.tie_word_embeddings = bool(getattr(self.base_config, "tie_word_embeddings", False))
        for name in MIRRORED_TOKENS:
            if getattr(self, name) is None:
                setattr(self, name, getattr(self.base_config, name, None))

    def get_text_config(self, decoder=None, encoder=None) -> PretrainedConfig:
        return self.base_config

    def __getattr__(self, name: str):
        # Only reached when normal lookup fails. Private names and the time before __post_init__ is
        # done stay strict, so copying, pickling and the dataclass machinery see no surprises.
        if name.startswith("_") or not self.__dict__.get("_post_init_done"):
            raise AttributeError(name)
        base = self.__dict__.get("base_config")
        if base is None or not hasattr(base, name):
            raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")
        return getattr(base, name)


__all__ = ["MoeifyConfig"]
