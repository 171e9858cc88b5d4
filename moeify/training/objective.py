"""The loss: weighted distillation, language-modelling and router terms on one forward pass.

- distill: KL(teacher || student) between next-token distributions softened by a temperature,
  times T² so its gradients keep their scale as T changes (Hinton et al.); mean over tokens.
- lm: next-token cross-entropy on the data.
- aux: the model's own router losses at the model's own coefficients (config), times the aux
  weight: the Switch/Mixtral load-balancing loss every format computes, and moeify's remote
  format's z-loss when its coefficient is set.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Weights:
    distill: float
    lm: float
    aux: float
    temperature: float = 1.0


@dataclass(frozen=True)
class RouterCoefficients:
    """What the model's config says its router losses weigh."""

    aux: float
    z: float

    @classmethod
    def of(cls, config) -> RouterCoefficients:
        moe = getattr(config, "moe", None)
        if isinstance(moe, dict):  # moeify's remote format keeps them in its moe section
            return cls(float(moe.get("router_aux_loss_coef", 0.0)), float(moe.get("router_z_loss_coef", 0.0)))
        return cls(float(getattr(config, "router_aux_loss_coef", 0.0) or 0.0), 0.0)


def distillation(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) per token, averaged, times T². Logits (B, L, V) -> scalar."""
    s = F.log_softmax(student.float().flatten(0, -2) / temperature, dim=-1)
    t = F.log_softmax(teacher.float().flatten(0, -2) / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of each next token: logits (B, L, V), ids (B, L) -> scalar."""
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())


def z_loss(router_logits: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """ST-MoE router z-loss: mean logsumexp(logits)² over tokens, averaged over MoE layers."""
    return torch.stack([torch.logsumexp(r.float(), dim=-1).square().mean() for r in router_logits]).mean()


class Loss:
    """Computes the total loss of a batch and its named terms (detached, for the log)."""

    def __init__(self, weights: Weights, coefficients: RouterCoefficients,
                 teacher: Callable[[torch.Tensor], torch.Tensor] | None):
        """teacher: ids (B, L) -> the teacher's logits (B, L, V), or None without distillation."""
        self.weights, self.coefficients, self.teacher = weights, coefficients, teacher
        self.aux_weight = weights.aux * coefficients.aux
        self.z_weight = weights.aux * coefficients.z

    @property
    def wants_router_outputs(self) -> bool:
        return self.aux_weight > 0 or self.z_weight > 0

    def __call__(self, model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """ids (B, L) -> (total loss, {term: value})."""
        kwargs = {"output_router_logits": True} if self.wants_router_outputs else {}
        out = model(input_ids=ids, **kwargs)
        terms: dict[str, torch.Tensor] = {}
        total = out.logits.new_zeros((), dtype=torch.float32)
        if self.weights.lm > 0:
            terms["lm"] = next_token_loss(out.logits, ids)
            total = total + self.weights.lm * terms["lm"]
        if self.weights.distill > 0:
            with torch.no_grad():
                teacher_logits = self.teacher(ids)
            terms["distill"] = distillation(out.logits, teacher_logits, self.weights.temperature)
            total = total + self.weights.distill * terms["distill"]
        if self.aux_weight > 0 and out.aux_loss is not None:
            terms["aux"] = out.aux_loss.float()
            total = total + self.aux_weight * terms["aux"]
        if self.z_weight > 0 and out.router_logits:
            terms["z"] = z_loss(out.router_logits)
            total = total + self.z_weight * terms["z"]
        return total, {name: value.detach() for name, value in terms.items()}
