"""Which parameters train, and the optimizer groups they fall into.

MoE blocks are found the way `verify` finds them (a `gate` or `router` child beside `experts`),
so native Mixtral, Qwen-MoE and the remote format need no table here. Everything else is
frozen with requires_grad=False: the optimizer never sees it and it comes out bit for bit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fnmatch import fnmatchcase

from torch import nn

from moeify.errors import MoeifyError
from moeify.training import frozen as frozen_experts
from moeify.training import lora
from moeify.training.settings import Trainable
from moeify.verify import blocks

_INDEX = re.compile(r"\.\d+\.")


@dataclass(frozen=True)
class Selection:
    trainable: dict[str, nn.Parameter]  # by name, in model order
    routers: frozenset[str]  # names of router parameters (their own learning rate)
    frozen: int  # parameters (elements) left frozen
    undecayed: frozenset[str] = frozenset()  # trained without weight decay: they hold frozen experts' slices


def select(model: nn.Module, train: Trainable, freeze: tuple[str, ...] = ()) -> Selection:
    """Mark the chosen parameters trainable and every other one frozen, with the experts config.json
    records as frozen (moeify expand --freeze old): see moeify.training.frozen."""
    named = dict(model.named_parameters())
    experts = frozen_experts.find(model)
    routers = _names_in(model, named, lambda block: block.router)
    scope = {
        Trainable.ROUTERS: routers,
        Trainable.EXPERTS: routers | _names_in(model, named, lambda block: block.experts),
        Trainable.MOE: _names_in(model, named, lambda block: block.module),
        Trainable.ALL: set(named),
    }[train]
    kept = frozen_by(freeze, named)
    chosen = scope - kept - experts.whole
    adapters = {name for name in named if lora.is_adapter(name)}
    if adapters:  # LoRA: the adapters train in place of the expert weights they adapt
        chosen = (chosen - lora.adapted(model)) | (adapters - kept)
    if not chosen:
        raise MoeifyError(f"--train {train.value} with these --freeze patterns leaves nothing to train")
    for name, parameter in named.items():
        parameter.requires_grad_(name in chosen)
    trainable = {name: p for name, p in named.items() if name in chosen}
    frozen = sum(p.numel() for name, p in named.items() if name not in chosen)
    return Selection(trainable, frozenset(routers & chosen), frozen, experts.sliced & chosen)


def _names_in(model: nn.Module, named: dict[str, nn.Parameter], part) -> set[str]:
    """Names of the parameters of part(block) over every MoE block."""
    ids = {id(p) for block in blocks(model).values() for p in part(block).parameters()}
    return {name for name, p in named.items() if id(p) in ids}


def frozen_by(patterns: tuple[str, ...], named: dict[str, nn.Parameter]) -> set[str]:
    """Names matched by any pattern: a glob over parameter names, or a plain substring of them."""
    out: set[str] = set()
    for pattern in patterns:
        glob = pattern if any(c in pattern for c in "*?[") else f"*{pattern}*"
        matched = {name for name in named if fnmatchcase(name, glob)}
        if not matched:
            raise MoeifyError(f"--freeze {pattern!r} matches no parameter; the model has: {templates(named)}")
        out |= matched
    return out


def templates(named: dict[str, nn.Parameter]) -> str:
    """Parameter names with layer and expert numbers folded into {i}, each kind once."""
    return ", ".join(dict.fromkeys(_INDEX.sub(".{i}.", name) for name in named))


def groups(selection: Selection, lr: float, router_lr: float, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: routers at their own rate; no weight decay on norms and biases (1-D), nor
    on fused expert tensors holding frozen experts (decay would move their frozen slices)."""
    out: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, parameter in selection.trainable.items():
        key = (name in selection.routers, parameter.ndim < 2 or name in selection.undecayed)
        out.setdefault(key, []).append(parameter)
    return [{"params": params, "lr": router_lr if router else lr, "weight_decay": 0.0 if flat else weight_decay}
            for (router, flat), params in out.items()]
