"""mergekit-moe's YAML read as a moeify merge, so `moeify apply config.yml --output DIR` replaces
`mergekit-moe config.yml DIR`.

The schema is mergekit-moe's (MoEMergeConfig): base_model, gate_mode, dtype, experts_per_token,
experts and shared_experts (each: source_model, positive_prompts, negative_prompts, noise_scale,
residual_scale), architecture. What moeify cannot do the same way is refused in one line naming
the field; the few choices that differ without changing the result's kind are said in notes.
"""

from __future__ import annotations

from typing import Any

from moeify.errors import MoeifyError
from moeify.merge import ExpertSource

TOP = {"base_model", "gate_mode", "dtype", "experts_per_token", "experts", "shared_experts", "architecture"}
EXPERT = {"source_model", "positive_prompts", "negative_prompts", "noise_scale", "residual_scale"}
# gate_mode -> (moeify gate, router_std): mergekit's random is a standard normal, uniform_random nn.Linear's init;
# its hidden variants (last token or average of the residual stream) all become moeify's hidden gates.
GATES = {"hidden": ("hidden", None), "hidden_avg": ("hidden", None), "hidden_last": ("hidden", None),
         "cheap_embed": ("cheap-embed", None), "random": ("random", 1.0), "uniform_random": ("uniform", None)}
DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16", "half": "float16",
          "bfloat16": "bfloat16", "bf16": "bfloat16"}
# architecture (mergekit matches a prefix of its output's name) -> moeify format
ARCHITECTURES = {"mixtral": "native", "qwen": "native", "qwen3": "native"}


def is_config(data: dict) -> bool:
    """A mergekit-moe config rather than a moeify recipe: it has base_model and experts."""
    return "base_model" in data and "experts" in data


def recipe(data: dict) -> tuple[str, dict[str, Any], list[str]]:
    """(BASE, moeify merge fields, notes) of a mergekit-moe config; one line for what moeify does not support."""
    unknown = sorted(set(data) - TOP)
    if unknown:
        raise MoeifyError(f"mergekit-moe config field {unknown[0]!r} is not one moeify supports; "
                          f"known: {', '.join(sorted(TOP))}")
    base = _model(data["base_model"], "base_model")
    experts = _experts(data.get("experts"), "experts")
    shared = _experts(data.get("shared_experts") or [], "shared_experts")
    if not experts:
        raise MoeifyError("mergekit-moe config: experts lists no expert; give each its source_model")
    gate, std = _gate(data.get("gate_mode", "hidden"))
    fields: dict[str, Any] = {
        "mode": "merge", "experts": len(experts), "shared_experts": len(shared), "gate": gate,
        "topk": _topk(data.get("experts_per_token", 2)),
        "router_init": "zeros" if gate == "zeros" else "random",
        "expert_sources": [e.to_dict() for e in experts],
        "shared_sources": [{"source": s.source, "scale": s.scale} for s in shared],
        "noise": _noise(data.get("experts") or [], data.get("shared_experts") or []),
        "format": _format(data.get("architecture"), bool(shared)),
    }
    if std is not None:
        fields["router_std"] = std
    if data.get("dtype") is not None:
        fields["dtype"] = _dtype(data["dtype"])
    notes = []
    if any(s.positive or s.negative for s in shared):
        notes.append("shared experts' prompts are not used: moeify's shared experts are always on (weight 1)")
    return base, fields, notes


def _model(value: object, what: str) -> str:
    """A model reference: a path or Hub id (mergekit's `model+lora` and dict forms are refused)."""
    if not isinstance(value, str) or not value.strip():
        raise MoeifyError(f"mergekit-moe config: {what} must be a model path or Hub id (got {str(value)[:60]})")
    if "+" in value:
        raise MoeifyError(f"mergekit-moe config: {what} {value!r} applies a LoRA (model+lora), which moeify does "
                          f"not; merge the LoRA into the model first")
    return value


def _experts(value: object, what: str) -> list[ExpertSource]:
    if not isinstance(value, list):
        raise MoeifyError(f"mergekit-moe config: {what} must be a list of experts with source_model")
    out = []
    for j, entry in enumerate(value):
        where = f"{what}[{j}]"
        if not isinstance(entry, dict):
            raise MoeifyError(f"mergekit-moe config: {where} must be a mapping with source_model")
        unknown = sorted(set(entry) - EXPERT)
        if unknown:
            raise MoeifyError(f"mergekit-moe config: {where} field {unknown[0]!r} is not one moeify supports; "
                              f"known: {', '.join(sorted(EXPERT))}")
        scale = entry.get("residual_scale")
        out.append(ExpertSource.from_dict(
            {"source": _model(entry.get("source_model"), f"{where}.source_model"),
             "positive": entry.get("positive_prompts"), "negative": entry.get("negative_prompts"),
             "scale": 1.0 if scale is None else scale}, f"mergekit-moe config: {where}"))
    return out


def _gate(mode: object) -> tuple[str, float | None]:
    if not isinstance(mode, str) or mode not in GATES:  # a list or mapping cannot even be looked up
        raise MoeifyError(f"mergekit-moe config: gate_mode {mode!r} is not one moeify supports; "
                          f"known: {', '.join(GATES)}")
    return GATES[mode]


def _topk(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise MoeifyError(f"mergekit-moe config: experts_per_token must be a whole number >= 1 (got {value!r})")
    return value


def _noise(experts: list, shared: list) -> float:
    """mergekit adds noise per expert; moeify one std for every routed expert, none to shared ones."""
    for entry in experts + shared:
        value = entry.get("noise_scale") if isinstance(entry, dict) else None
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
            raise MoeifyError(f"mergekit-moe config: noise_scale must be a number >= 0 (got {str(value)[:40]})")
    routed = {float(e.get("noise_scale") or 0.0) for e in experts if isinstance(e, dict)}
    if len(routed) > 1:
        raise MoeifyError("mergekit-moe config: experts have different noise_scale values; moeify adds one noise "
                          "std to every routed expert: give them all the same")
    if any(isinstance(s, dict) and s.get("noise_scale") for s in shared):
        raise MoeifyError("mergekit-moe config: shared_experts' noise_scale is not supported; moeify adds noise to "
                          "routed experts only")
    return routed.pop() if routed else 0.0


def _format(architecture: object, shared: bool) -> str:
    if architecture is None:
        return "auto"
    name = str(architecture).lower()
    if name not in ARCHITECTURES:
        raise MoeifyError(f"mergekit-moe config: architecture {architecture!r} is not one moeify writes; "
                          f"moeify writes {', '.join(ARCHITECTURES)} (native) or its remote format")
    if name == "mixtral" and shared:
        raise MoeifyError("mergekit-moe config: architecture mixtral has no shared experts; drop shared_experts "
                          "or use architecture qwen")
    if name == "qwen" and not shared:
        raise MoeifyError("mergekit-moe config: architecture qwen needs a shared expert (as in mergekit-moe); "
                          "add shared_experts or use architecture mixtral")
    return ARCHITECTURES[name]


def _dtype(value: object) -> str:
    if not isinstance(value, str) or value not in DTYPES:
        raise MoeifyError(f"mergekit-moe config: dtype {value!r} is not one moeify writes; "
                          f"use float32, float16 or bfloat16")
    return DTYPES[value]
