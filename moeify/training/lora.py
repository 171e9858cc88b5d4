"""LoRA on the routed experts, through peft: low-rank adapters train instead of the expert weights.

Each format's experts are targeted where they live: the remote format's per-expert nn.Linear
projections by module name (peft's target_modules), native transformers 5 MoE classes' fused
3-D expert tensors (E, out, in) by parameter name (peft's target_parameters, one adapter per
tensor covering every expert). What else --train selects (routers, shared experts, ...) trains
in full beside the adapters. The written model has the adapters merged into the expert weights
(its format and tensor names unchanged), or, with --no-merge-lora, the base weights as they were
and the adapter folder in DIR/adapter (peft's own format, loadable with PeftModel.from_pretrained).
"""

from __future__ import annotations

import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from moeify.errors import MoeifyError
from moeify.verify import blocks

ADAPTER = "adapter"  # the adapter folder inside the output, with --no-merge-lora
PREFIX = "base_model.model."  # what peft puts before the wrapped model's parameter names
_LORA = (".lora_A.", ".lora_B.")


@dataclass(frozen=True)
class Targets:
    modules: list[str]  # full names of expert nn.Linear modules (per-expert formats)
    parameters: list[str]  # full names of fused expert tensors (native formats)


def require_peft() -> None:
    try:
        import peft  # noqa: F401
    except ImportError:
        raise MoeifyError("--lora-rank needs peft, which is not installed; pip install 'moeify[train]'") from None


def targets(model: nn.Module) -> Targets:
    """The routed experts' weights in every MoE block, as peft names them."""
    modules, parameters = [], []
    for block in blocks(model).values():
        experts = block.experts
        prefix = _name_of(model, experts)
        if isinstance(experts, nn.ModuleList):
            modules += [f"{prefix}.{n}" for n, m in experts.named_modules() if isinstance(m, nn.Linear)]
        else:
            parameters += [f"{prefix}.{n}" for n, p in experts.named_parameters(recurse=False) if p.ndim == 3]
    if not modules and not parameters:
        raise MoeifyError("--lora-rank: this model's experts are neither nn.Linear modules nor fused 3-D "
                          "tensors, which is all peft can adapt; train without --lora-rank")
    return Targets(modules, parameters)


def _name_of(model: nn.Module, module: nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


def wrap(model: nn.Module, rank: int, alpha: float | None) -> nn.Module:
    """The model with LoRA adapters on its experts (peft's PeftModel); adapters start as a zero update."""
    require_peft()
    from peft import LoraConfig, get_peft_model

    found = targets(model)
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, lora_dropout=0.0,
                        target_modules=found.modules, target_parameters=found.parameters or None)
    with warnings.catch_warnings():  # peft asks transformers with a name it has deprecated: not the user's to fix
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, config)


def is_adapter(name: str) -> bool:
    return any(part in name for part in _LORA)


def adapted(peft_model: nn.Module) -> set[str]:
    """Names (in the PeftModel) of the expert weights the adapters stand for: they stay frozen."""
    names = set()
    for name, _ in peft_model.named_parameters():
        if ".base_layer." in name and not is_adapter(name):
            names.add(name)
    return names


def unwrap(peft_model: nn.Module, merge: bool, folder: Path | None) -> nn.Module:
    """The base model to write: adapters merged in, or (folder given) saved there and removed."""
    if merge:
        return peft_model.merge_and_unload()
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)  # what a killed export left
        peft_model.save_pretrained(folder)
    return peft_model.unload()
