"""Configuration of a moeify remote-format checkpoint (copied as-is into every remote output).

A moeify model is a dense family's own transformers model whose chosen FFNs are Mixture-of-Experts
blocks. Its config therefore holds two parts: `base_config`, the source family's full config (a
sub-config, rebuilt through AutoConfig from its `model_type`), and `moe`, a plain dict describing the
blocks. Self-contained: it imports only transformers. Every `moe` field is checked when the config
is built, so a bad checkpoint fails on loading with one clear ValueError instead of later or silently.
"""

from __future__ import annotations

import math
import re

from transformers import AutoConfig, PretrainedConfig
from transformers.activations import ACT2FN
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
FLAGS = ("gated", "bias", "output_bias", "norm_topk_prob", "aux_free_bias")
COEFFICIENTS = ("router_aux_loss_coef", "router_z_loss_coef", "router_jitter_noise", "aux_free_update_rate")
# mlp_path: attribute names joined by dots, the layer index as one whole component. It is filled in
# with str.replace, never str.format, which would walk attributes ("{i.__class__}") and honour
# width specs ("{i:>999999999}").
LAYER = "{i}"
MLP_PATH = re.compile(r"(?:[A-Za-z][A-Za-z0-9_]*|\{i\})(?:\.(?:[A-Za-z][A-Za-z0-9_]*|\{i\}))*")
MIRRORED_TOKENS = ("bos_token_id", "eos_token_id", "pad_token_id")

# Every key of the `peer` dict with its default: a checkpoint's PEER layers (product-key retrieval of
# single-neuron experts), beside or instead of its MoE layers. A checkpoint may omit any of them.
PEER_DEFAULTS: dict = {
    "mlp_path": "model.layers.{i}.mlp",  # module path, relative to the *ForCausalLM, of the FFN to replace
    "peer_layers": [],  # indices of the layers whose FFN is a PEER block
    "num_neurons": None,  # experts (single neurons) per layer; None: the base config's intermediate size
    "num_sub_keys": None,  # n, the grid's side: the smallest with n² >= num_neurons (None: computed)
    "num_heads": 1,  # retrieval heads, each with its own query projection and sub-keys
    "num_neurons_per_head": 16,  # top-k of each head
    "key_dim": 128,  # query size per head; each sub-key has key_dim / 2
    "num_shared_neurons": 0,  # always-on neurons, one dense FFN of this width (0: none)
    "hidden_act": "silu",  # a transformers ACT2FN key
    "gated": True,  # act(gate·x) * (up·x); False: act(up·x)
    "bias": False,  # neurons carry gate and up biases
    "output_bias": False,  # one (H,) bias added once to the block output (the FFN's down bias)
    "scoring": "softmax",  # "softmax" over each head's k scores, or "unit" (1 per distinct neuron)
    "query_norm": False,  # BatchNorm over the queries, as in the PEER paper
    "magnitude": False,  # retrieve by |score| (both signs of a query) instead of by score
}
PEER_FLAGS = ("gated", "bias", "output_bias", "query_norm", "magnitude")


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
    peer: dict | None = None  # PEER layers (see PEER_DEFAULTS); None in MoE checkpoints
    output_router_logits: bool = False  # return router logits and the aux loss by default
    # Mirrored from base_config: weight tying and the default generation config read them here.
    tie_word_embeddings: bool = False
    bos_token_id: int | list[int] | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.moe is not None and not isinstance(self.moe, dict):
            raise ValueError(f"moe must be a mapping of MoE fields, got {_shown(self.moe)}")
        self.moe = {**MOE_DEFAULTS, **(self.moe or {})}
        if self.moe["expert_intermediate_size"] is None:  # the family's FFN width (gpt2 leaves it implicit: 4H)
            base = self.base_config
            self.moe["expert_intermediate_size"] = getattr(base, "intermediate_size", None) or 4 * base.hidden_size
        check_moe(self.moe, getattr(self.base_config, "num_hidden_layers", None))
        self.moe["moe_layers"] = list(self.moe["moe_layers"])
        if self.peer is not None:
            self.peer = peer_section(self.peer, self.base_config)
        self.tie_word_embeddings = bool(getattr(self.base_config, "tie_word_embeddings", False))
        for name in MIRRORED_TOKENS:
            if getattr(self, name) is None:
                setattr(self, name, getattr(self.base_config, name, None))

    def mlp_path(self, layer: int) -> str:
        """The module path of one layer's FFN (the block that replaces it lives there)."""
        return self.moe["mlp_path"].replace(LAYER, str(layer))

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


def check_moe(moe: dict, num_layers: int | None) -> None:
    """Raise a ValueError naming the first field of `moe` that is out of range."""
    path = moe["mlp_path"]
    if not isinstance(path, str) or not MLP_PATH.fullmatch(path) or path.split(".").count(LAYER) != 1:
        raise ValueError(f"moe.mlp_path must be a dotted path of names with {LAYER} once, for the layer index "
                         f"(e.g. 'model.layers.{LAYER}.mlp'), got {_shown(path)}")
    _check_integer(moe, "num_experts", 1)
    _check_integer(moe, "num_experts_per_tok", 1, moe["num_experts"])
    _check_integer(moe, "num_shared_experts", 0)
    _check_integer(moe, "expert_intermediate_size", 1)
    if moe["shared_intermediate_size"] is not None:
        _check_integer(moe, "shared_intermediate_size", 1)
    for name in COEFFICIENTS:
        if not _is_number(moe[name]) or moe[name] < 0:
            raise ValueError(f"moe.{name} must be a finite number >= 0, got {_shown(moe[name])}")
    factor = moe["capacity_factor"]
    if factor is not None and not (_is_number(factor) and factor > 0):
        raise ValueError(f"moe.capacity_factor must be null (no token dropping) or a finite number > 0, "
                         f"got {_shown(factor)}")
    for name in FLAGS:
        if not isinstance(moe[name], bool):
            raise ValueError(f"moe.{name} must be true or false, got {_shown(moe[name])}")
    if moe["scoring"] not in SCORINGS:
        raise ValueError(f"moe.scoring must be one of {SCORINGS}, got {_shown(moe['scoring'])}")
    if not isinstance(moe["hidden_act"], str) or moe["hidden_act"] not in ACT2FN:
        raise ValueError(f"moe.hidden_act must be a key of transformers' ACT2FN (e.g. silu, gelu_pytorch_tanh, "
                         f"relu), got {_shown(moe['hidden_act'])}")
    _check_layers(moe["moe_layers"], num_layers)


def _check_integer(moe: dict, name: str, low: int, high: int | None = None) -> None:
    value = moe[name]
    if not _is_integer(value) or value < low or (high is not None and value > high):
        bound = f"from {low} to {high} (num_experts)" if high is not None else f">= {low}"
        raise ValueError(f"moe.{name} must be an integer {bound}, got {_shown(value)}")


def _check_layers(layers: object, num_layers: int | None) -> None:
    last = "num_hidden_layers - 1" if num_layers is None else num_layers - 1
    if (not isinstance(layers, (list, tuple))
            or not all(_is_integer(i) and 0 <= i and (num_layers is None or i < num_layers) for i in layers)
            or len(set(layers)) != len(layers)):
        raise ValueError(f"moe.moe_layers must list distinct layer indices from 0 to {last}, got {_shown(layers)}")


def peer_section(peer: object, base: PretrainedConfig) -> dict:
    """The `peer` dict with its defaults filled in and every field checked (a ValueError names the first bad one)."""
    if not isinstance(peer, dict):
        raise ValueError(f"peer must be a mapping of PEER fields, got {_shown(peer)}")
    peer = {**PEER_DEFAULTS, **peer}
    if peer["num_neurons"] is None:  # the family's FFN width (gpt2 leaves it implicit: 4H)
        peer["num_neurons"] = getattr(base, "intermediate_size", None) or 4 * base.hidden_size
    _check_peer_integer(peer, "num_neurons", 1)
    if peer["num_sub_keys"] is None:
        peer["num_sub_keys"] = math.isqrt(peer["num_neurons"] - 1) + 1
    check_peer(peer, getattr(base, "num_hidden_layers", None))
    peer["peer_layers"] = list(peer["peer_layers"])
    return peer


def check_peer(peer: dict, num_layers: int | None) -> None:
    """Raise a ValueError naming the first field of a filled-in `peer` dict that is out of range."""
    path = peer["mlp_path"]
    if not isinstance(path, str) or not MLP_PATH.fullmatch(path) or path.split(".").count(LAYER) != 1:
        raise ValueError(f"peer.mlp_path must be a dotted path of names with {LAYER} once, for the layer index "
                         f"(e.g. 'model.layers.{LAYER}.mlp'), got {_shown(path)}")
    neurons = peer["num_neurons"]
    side = math.isqrt(neurons - 1) + 1
    _check_peer_integer(peer, "num_sub_keys", side, side, f"{side}, the smallest n with n² >= num_neurons")
    _check_peer_integer(peer, "num_heads", 1)
    _check_peer_integer(peer, "num_neurons_per_head", 1, neurons, f"from 1 to num_neurons ({neurons})")
    _check_peer_integer(peer, "num_shared_neurons", 0)
    if not _is_integer(peer["key_dim"]) or peer["key_dim"] < 2 or peer["key_dim"] % 2:
        raise ValueError(f"peer.key_dim must be an even integer >= 2 (two halves), got {_shown(peer['key_dim'])}")
    for name in PEER_FLAGS:
        if not isinstance(peer[name], bool):
            raise ValueError(f"peer.{name} must be true or false, got {_shown(peer[name])}")
    if peer["scoring"] not in SCORINGS:
        raise ValueError(f"peer.scoring must be one of {SCORINGS}, got {_shown(peer['scoring'])}")
    if not isinstance(peer["hidden_act"], str) or peer["hidden_act"] not in ACT2FN:
        raise ValueError(f"peer.hidden_act must be a key of transformers' ACT2FN, got {_shown(peer['hidden_act'])}")
    layers, last = peer["peer_layers"], "num_hidden_layers - 1" if num_layers is None else num_layers - 1
    if (not isinstance(layers, (list, tuple)) or len(set(layers)) != len(layers)
            or not all(_is_integer(i) and 0 <= i and (num_layers is None or i < num_layers) for i in layers)):
        raise ValueError(f"peer.peer_layers must list distinct layer indices from 0 to {last}, got {_shown(layers)}")


def _check_peer_integer(peer: dict, name: str, low: int, high: int | None = None, wanted: str | None = None) -> None:
    value = peer[name]
    if not _is_integer(value) or value < low or (high is not None and value > high):
        raise ValueError(f"peer.{name} must be an integer {wanted or f'>= {low}'}, got {_shown(value)}")


def _is_integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    """A finite int or float (not a bool, which JSON keeps apart and Python counts as an int)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond any float
        return False


def _shown(value: object, limit: int = 80) -> str:
    """repr, cut short: an error message stays one readable line whatever a config holds."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


__all__ = ["MoeifyConfig"]
