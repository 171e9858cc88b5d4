"""Refuse a model folder whose config.json and weights disagree, before anything is written.

Two checks, each failing with one line that names the field or tensor:

- `check_config`: the numbers moeify sizes loops and tensors by are integers within bounds,
  `model_type` is a name, `dtype` a torch floating-point dtype. config.json alone, so it runs
  on every config.json a checkpoint is read with, and before `moeify inspect` counts anything.
- `check_weights`: the tensors transformers builds from config.json, instantiated on the meta
  device (shapes, no memory), against the checkpoint's headers: the decoder layers the config
  counts, every tensor present with the shape the config implies, none the model would drop.
  A mismatch here is a checkpoint that loads half-random or not at all, or another family's.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

from moeify.errors import MoeifyError

if TYPE_CHECKING:
    from torch import nn

    from moeify.adapters import Adapter
    from moeify.checkpoint import Checkpoint
    from moeify.moe_source import MoESource

# (lowest, highest) of every config number moeify sizes a loop or a tensor by. The upper bounds sit far
# above any released model (the largest have 126 layers, hidden size 16384, FFN width 53248, 128 heads,
# a 262144-token vocabulary, a few hundred experts), so only a typo or a hostile file meets them, and
# `num_hidden_layers: 1e9` is refused before anything loops a billion times.
LAYERS = (1, 1024)
WIDTH = (1, 2**20)
HEADS = (1, 4096)
EXPERTS = (0, 2**14)
BOUNDS: dict[str, tuple[int, int]] = {
    "num_hidden_layers": LAYERS, "n_layer": LAYERS,
    "hidden_size": (1, 2**17), "n_embd": (1, 2**17),
    "intermediate_size": WIDTH, "n_inner": WIDTH, "moe_intermediate_size": WIDTH,
    "expert_intermediate_size": WIDTH, "shared_intermediate_size": WIDTH,
    "shared_expert_intermediate_size": (0, 2**20),  # Qwen2-MoE: 0 is no shared expert
    "num_attention_heads": HEADS, "n_head": HEADS, "num_key_value_heads": HEADS, "head_dim": (1, 2**14),
    "vocab_size": (1, 2**23),
    "num_local_experts": EXPERTS, "num_experts": EXPERTS, "n_routed_experts": EXPERTS,
    "num_experts_per_tok": EXPERTS, "n_shared_experts": EXPERTS, "num_shared_experts": EXPERTS,
    "decoder_sparse_step": LAYERS, "moe_layer_freq": LAYERS, "first_k_dense_replace": (0, LAYERS[1]),
}
# The fields among those that size a tensor's dimension directly (named when a shape disagrees).
DIMENSIONS = {"hidden_size", "n_embd", "intermediate_size", "n_inner", "moe_intermediate_size",
              "expert_intermediate_size", "shared_intermediate_size", "shared_expert_intermediate_size",
              "head_dim", "vocab_size", "num_local_experts", "num_experts", "n_routed_experts"}
LAYER_LISTS = ("mlp_only_layers", "moe_layers")  # lists of layer indices
NESTED = ("base_config", "text_config", "moe")  # sub-configs checked like the top level (moeify's remote format)
DTYPES = ("dtype", "torch_dtype")
# Checkpoint names transformers drops silently on load whatever the family (legacy buffers).
LEGACY = (r"rotary_emb\.inv_freq", r"(^|\.)position_ids$")
_CODE = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()  # a changed check forgets old verdicts
FIX = "config.json does not describe these weights: fix it or re-download the model"


# ---------------------------------------------------------------------------- config.json alone


def check_config(config: dict, prefix: str = "") -> None:
    """Refuse config numbers, names and dtypes moeify cannot use; null leaves a field to transformers."""
    model_type = config.get("model_type")
    if model_type is not None and not isinstance(model_type, str):
        raise MoeifyError(f"config.json: {prefix}model_type must be a name like \"llama\", got {_shown(model_type)}; "
                          f"fix config.json")
    for name, (low, high) in BOUNDS.items():
        value = config.get(name)
        if value is not None and not (_is_integer(value) and low <= value <= high):
            raise MoeifyError(f"config.json: {prefix}{name} must be an integer from {low} to {high} "
                              f"(moeify's bound, far above any released model), got {_shown(value)}; fix config.json")
    for name in LAYER_LISTS:
        _check_layer_list(config.get(name), prefix + name)
    for name in DTYPES:
        _check_dtype(config.get(name), prefix + name)
    for name in NESTED:
        if isinstance(config.get(name), dict):
            check_config(config[name], f"{prefix}{name}.")


def _check_layer_list(value: object, name: str) -> None:
    if value is None:
        return
    top = LAYERS[1]
    if not isinstance(value, list) or len(value) > top or not all(_is_integer(i) and 0 <= i < top for i in value):
        raise MoeifyError(f"config.json: {name} must be a list of layer indices from 0 to {top - 1}, "
                          f"got {_shown(value)}; fix config.json")


def _check_dtype(value: object, name: str) -> None:
    if value is None or value in ("auto", "float32", "bfloat16", "float16"):
        return  # the usual names, known good without torch (~1 s to import: `moeify inspect` stays instant)
    import torch

    dtype = getattr(torch, value, None) if isinstance(value, str) else None
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise MoeifyError(f"config.json: {name} must name a torch floating-point dtype (float32, bfloat16, "
                          f"float16), got {_shown(value)}; fix config.json")


def _is_integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON's true is no number


def _shown(value: object, limit: int = 60) -> str:
    """repr, cut short: the message stays one readable line whatever the config holds."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------- config.json against the weights


def check_weights(ckpt: Checkpoint, reader: Adapter | MoESource) -> None:
    """Refuse a checkpoint (seen under the reader's in-memory names) that is not the model its config describes."""
    _check_layer_count(ckpt, reader)
    _check_read(ckpt, reader)
    verdict = _verdict(ckpt)
    if verdict.exists():
        return  # this very config with these very tensor shapes passed before
    model = empty_model(ckpt.config)
    expected = expected_shapes(model, reader)
    found = {name: info.shape for name, info in ckpt.tensors.items()}
    _check_expected(model, expected, found, ckpt.config)
    _check_floats(ckpt, expected)
    dropped = _patterns((*(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ()), *LEGACY))
    for name in found:
        if name not in expected and not dropped.search(name):
            raise MoeifyError(f"the weights hold {name}, which the {_family(ckpt.config)} model of config.json "
                              f"has not (transformers would drop it); {FIX}")
    _remember(verdict)


def _check_floats(ckpt: Checkpoint, expected: dict) -> None:
    """The model's parameters are floating point: an integer one would be copied into the output as it
    is (its bytes are the right size), and no model computes with it. Only the model's own: a family
    may keep integer buffers it drops on load (GPT-NeoX's boolean attention mask)."""
    for name, info in ckpt.tensors.items():
        if name in expected and not info.dtype.is_floating_point:
            raise MoeifyError(f"the weights hold {name} as {str(info.dtype).removeprefix('torch.')}, but model "
                              f"weights are floating point; dequantize a quantized checkpoint first, or re-download it")


def _check_layer_count(ckpt: Checkpoint, reader: Adapter | MoESource) -> None:
    """The decoder layers the weights hold, against the count config.json states."""
    prefix = reader.mlp.split("{i}")[0]  # "model.layers.", "transformer.h."
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    held = sorted({int(m.group(1)) for name in ckpt.tensors if (m := pattern.match(name))})
    count = reader.num_layers(ckpt.config)
    if held == list(range(count)):
        return
    if not held:
        raise MoeifyError(f"config.json describes a {_family(ckpt.config)} model, whose layers are {prefix}N, "
                          f"but the weights hold no such tensor; {FIX}")
    from moeify.moe_source import field_of

    field = next(s for s in reader.layers_field.split("|") if field_of(ckpt.config, s) is not None)
    raise MoeifyError(f"config.json says {field}={count} but the weights hold layers {_span(held)}; {FIX}")


def _check_read(ckpt: Checkpoint, reader: Adapter | MoESource) -> None:
    """The tensors moeify itself reads (every converted layer's FFN, or router and experts) are in the weights.

    Runs before the model is built and stops at the first absent name, so a config that claims
    thousands of experts costs no more than the weights really hold.
    """
    config = ckpt.config
    layers = reader.moe_layers(config) if reader.moe else range(reader.num_layers(config))
    for layer in layers:
        for name in reader.ffn_names(layer).values():
            if name not in ckpt.tensors:
                raise MoeifyError(f"tensor {name} (layer {layer}'s FFN in the {_family(config)} model config.json "
                                  f"describes) is missing from the weights: the checkpoint is incomplete, or "
                                  f"config.json is not its config; re-download the model")


def _check_expected(model: nn.Module, expected: dict, found: dict, config: dict) -> None:
    """Every tensor the model has is in the weights (unless tied or filled in by transformers), shaped alike."""
    optional = _patterns(getattr(model, "_keys_to_ignore_on_load_missing", None) or ())
    for name, shape in expected.items():
        if name not in found:
            if name in model.all_tied_weights_keys or optional.search(name):
                continue  # tied to the embedding, or transformers fills it itself
            raise MoeifyError(f"tensor {name} {_shape(shape)} of the {_family(config)} model config.json "
                              f"describes is missing from the weights: the checkpoint is incomplete, or "
                              f"config.json is not its config; re-download the model")
        if found[name] != shape:
            raise MoeifyError(f"{name} is {_shape(found[name])} in the weights but config.json implies "
                              f"{_shape(shape)}{_culprits(config, found[name], shape)}; {FIX}")


def _verdict(ckpt: Checkpoint) -> Path:
    """Where a passed check of exactly this config and these tensor shapes and dtypes is remembered.

    The first model built in a process imports transformers' modeling code (about 1 s of CPU, five
    times the check itself on SmolLM2-135M); a conversion repeated on the same source skips both.
    The key holds all the check reads, plus the transformers version and this module's own text.
    """
    import transformers

    from moeify.source import cache_dir

    shapes = sorted((name, info.shape, str(info.dtype)) for name, info in ckpt.tensors.items())
    key = json.dumps([ckpt.config, shapes, transformers.__version__, _CODE], sort_keys=True, default=str)
    return cache_dir() / "checked" / hashlib.sha256(key.encode()).hexdigest()


def _remember(verdict: Path) -> None:
    try:
        verdict.parent.mkdir(parents=True, exist_ok=True)
        verdict.touch()
    except OSError:  # a read-only cache costs the next run the check, nothing else
        pass


def empty_model(config: dict) -> nn.Module:
    """The transformers model config.json describes, on the meta device: tensor shapes, no memory.

    A moeify remote checkpoint is built from moeify's own copy of its modeling code, never the folder's.
    """
    import torch

    built = transformers_config(config)
    try:
        with torch.device("meta"):
            if config.get("model_type") == "moeify":
                from moeify.targets.remote_code.modeling_moeify import MoeifyForCausalLM

                return MoeifyForCausalLM(built)
            from transformers import AutoModelForCausalLM

            return AutoModelForCausalLM.from_config(built)
    except Exception as e:  # whatever transformers objects to, in its own words
        raise MoeifyError(f"transformers cannot build the {_family(config)} model of config.json "
                          f"({_reason(e)}); fix it or re-download the model") from None


def transformers_config(config: dict):
    """config.json as transformers' config class, which checks every field's type."""
    fields = {k: v for k, v in config.items() if k != "model_type"}
    try:
        if config.get("model_type") == "moeify":
            from moeify.targets.remote_code.configuration_moeify import MoeifyConfig

            return MoeifyConfig(**fields)
        from transformers import AutoConfig

        return AutoConfig.for_model(config.get("model_type"), **fields)
    except Exception as e:
        raise MoeifyError(f"config.json is not a valid {_family(config)} config ({_reason(e)}); "
                          f"fix it or re-download the model") from None


def expected_shapes(model: nn.Module, reader: Adapter | MoESource) -> dict[str, tuple[int, ...]]:
    """Every tensor the model saves, by the name the reader sees in a checkpoint, with its shape.

    transformers keeps some families' experts fused in memory and saves them one by one (Mixtral's
    experts.{j}.w1); reverting its own conversion gives the names as saved.
    """
    from transformers.core_model_loading import revert_weight_conversion

    saved = revert_weight_conversion(model, model.state_dict())
    names = {name: reader.loaded_name(name) for name in saved}
    return {names[name]: tuple(t.shape) for name, t in saved.items() if names[name] is not None}


def _family(config: dict) -> str:
    model_type = config.get("model_type")
    if model_type == "moeify" and isinstance(config.get("base_config"), dict):
        return f"moeify (over {config['base_config'].get('model_type')})"
    return str(model_type)


def _culprits(config: dict, found: tuple[int, ...], expected: tuple[int, ...]) -> str:
    """' (vocab_size=300)': the config sizes equal to a dimension the weights disagree with."""
    sizes = {e for f, e in zip(found, expected) if f != e}
    named = [f"{k}={v}" for k, v in _fields(config) if k.rpartition(".")[2] in DIMENSIONS and v in sizes]
    return f" ({', '.join(named)})" if named else ""


def _fields(config: dict, prefix: str = ""):
    """(dotted name, value) of every field, sub-configs included."""
    for key, value in config.items():
        if isinstance(value, dict) and key in NESTED:
            yield from _fields(value, f"{prefix}{key}.")
        else:
            yield prefix + key, value


def _patterns(patterns) -> re.Pattern:
    """One regex searching for any of transformers' key patterns (one that never matches when there are none)."""
    return re.compile("|".join(f"(?:{p})" for p in patterns) or r"(?!)")


def _shape(shape: tuple[int, ...]) -> str:
    return f"({', '.join(map(str, shape))})" if len(shape) != 1 else f"({shape[0]},)"


def _span(indices: list[int]) -> str:
    """[0, 1, 2, 5] -> '0..2, 5'."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and runs[-1][-1] == i - 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return ", ".join(f"{r[0]}..{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)


def _reason(error: Exception) -> str:
    """The last line of an exception's message (transformers puts the field's complaint there), cut short."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[-1] if lines else type(error).__name__
    return text if len(text) <= 160 else text[:157] + "..."
