"""Experts that `moeify expand --freeze old` recorded as frozen stay bit for bit what they were.

config.json records them as `moe.frozen_experts` (remote format) or `frozen_experts` (native).
Where each expert is its own module (remote), its parameters simply do not train. Native
transformers 5 MoE classes fuse every expert of a layer into 3-D tensors (E, out, in): there a
gradient hook zeroes the frozen experts' slices, and the tensor is kept out of weight decay
(AdamW decays every element, whatever its gradient). A zero gradient from the first step keeps
Adam's moments at zero, so the update of those slices is exactly zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moeify.errors import MoeifyError
from moeify.expand import frozen_parameters
from moeify.verify import blocks


@dataclass(frozen=True)
class FrozenExperts:
    indices: tuple[int, ...]  # expert numbers, as the router counts them
    whole: frozenset[str]  # parameters of per-expert modules: not trained at all
    sliced: frozenset[str]  # fused (E, ...) parameters: frozen rows kept by a gradient hook

    def __bool__(self) -> bool:
        return bool(self.whole or self.sliced)


def recorded(config) -> tuple[int, ...]:
    """The expert numbers config.json records as frozen; () when none."""
    moe = getattr(config, "moe", None)
    frozen = moe.get("frozen_experts") if isinstance(moe, dict) else getattr(config, "frozen_experts", None)
    return tuple(frozen or ())


def find(model: nn.Module) -> FrozenExperts:
    """Where the recorded frozen experts live in this model's parameters."""
    indices = recorded(model.config)
    if not indices:
        return FrozenExperts((), frozenset(), frozenset())
    whole = frozenset(frozen_parameters(model, model.config))
    named = {id(p): name for name, p in model.named_parameters()}
    fused = {named[id(p)] for block in blocks(model).values() if not isinstance(block.experts, nn.ModuleList)
             for p in block.experts.parameters() if p.ndim == 3}
    return FrozenExperts(indices, whole, frozenset(fused))


def keep(model: nn.Module, frozen: FrozenExperts, distributed: str) -> None:
    """Zero the frozen slices of every trainable fused expert tensor's gradient, (E, out, in)."""
    named = dict(model.named_parameters())
    trained = [named[n] for n in sorted(frozen.sliced) if named[n].requires_grad]
    if trained and distributed in ("FSDP", "DEEPSPEED"):
        raise MoeifyError(f"this model's frozen experts (config frozen_experts) are slices of fused expert "
                          f"tensors, which {distributed} shards before a gradient hook can see them; train it "
                          f"with DDP or on one process")
    rows = torch.tensor(frozen.indices)
    for parameter in trained:
        parameter.register_hook(lambda grad: grad.index_fill(0, rows.to(grad.device), 0))
