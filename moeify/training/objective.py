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

from moeify.errors import MoeifyError


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


class LocalLoss:
    """Layer-wise reconstruction: each MoE block learns to give what the teacher's module at the
    same path (the dense FFN it came from) gives, on the teacher's own hidden states.

    One teacher forward collects every such module's input and output; each student block then
    runs on those inputs alone, so the backward pass stays inside the blocks and never crosses the
    model. The term is the squared error relative to the target's square, averaged over layers.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, autocast: Callable):
        from moeify.verify import blocks

        names = {id(module): name for name, module in student.named_modules()}
        self.paths = [names[id(block.module)] for block in blocks(student).values()]
        teacher_modules = dict(teacher.named_modules())
        missing = [path for path in self.paths if path not in teacher_modules]
        if missing:
            raise MoeifyError(f"the teacher has no module at {missing[0]}; --objective local needs the model "
                              f"this one was converted from as the teacher")
        self.student, self.teacher, self.autocast = student, teacher, autocast

    def __call__(self, model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """ids (B, L) -> (mean relative squared error over MoE layers, {"local": it})."""
        pairs = self._targets(ids)
        errors = []
        with self.autocast():
            for path, (x, y) in pairs.items():
                out = self.student.get_submodule(path)(x)
                errors.append((out.float() - y).square().sum() / y.square().sum().clamp_min(1e-12))
        total = torch.stack(errors).mean()
        return total, {"local": total.detach()}

    def _targets(self, ids: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{path: (input (B, L, H), output (B, L, H) float32)} of the teacher's modules."""
        pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

        def keep(path: str):
            def hook(module, args, output):
                pairs[path] = (args[0].detach(), (output[0] if isinstance(output, tuple) else output).float())
            return hook

        handles = [self.teacher.get_submodule(p).register_forward_hook(keep(p)) for p in self.paths]
        try:
            with torch.no_grad(), self.autocast():
                self.teacher(input_ids=ids)
        finally:
            for handle in handles:
                handle.remove()
        return pairs
