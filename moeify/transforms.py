"""Pure tensor functions on one layer's FFN: an `FFN` in, a `MoELayer` out.

Shapes follow nn.Linear: a projection from H to I is stored as (I, H).
No I/O happens here; every function also runs on meta tensors, which is how a
conversion learns output shapes before any bytes exist.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch

from moeify.errors import MoeifyError
from moeify.spec import RouterInit, Scoring, Spec  # noqa: F401 (Scoring lives in spec, light for the CLI)


@dataclass(frozen=True)
class FFN:
    """A feed-forward block: down(act(gate(x)) * up(x)), or down(act(up(x))) without a gate.

    up, gate: (I, H); down: (H, I); biases (I,) and (H,) where the family has them.
    """

    up: torch.Tensor
    down: torch.Tensor
    gate: torch.Tensor | None = None
    up_bias: torch.Tensor | None = None
    gate_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None

    @property
    def intermediate_size(self) -> int:
        return self.up.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.up.shape[1]

    def tensors(self) -> dict[str, torch.Tensor]:
        """The present weights by role (gate, up, down, and biases)."""
        roles = ("gate", "up", "down", "gate_bias", "up_bias", "down_bias")
        return {role: getattr(self, role) for role in roles if getattr(self, role) is not None}

    def map(self, fn: Callable[[str, torch.Tensor], torch.Tensor]) -> FFN:
        return replace(self, **{role: fn(role, t) for role, t in self.tensors().items()})

    def neurons(self, index: torch.Tensor) -> FFN:
        """The sub-FFN made of the given intermediate neurons (down bias kept whole)."""
        return self.map(lambda role, t: t if role == "down_bias" else (t[:, index] if role == "down" else t[index]))

    def scaled(self, factor: float) -> FFN:
        """Output multiplied by factor: scale the down projection (linear, so exact for any activation)."""
        if factor == 1:
            return self
        return self.map(lambda role, t: t * factor if role in ("down", "down_bias") else t)


class LazyExperts(Sequence):
    """Experts computed on demand, the last one cached: memory stays one expert, whatever their count."""

    def __init__(self, count: int, make: Callable[[int], FFN]):
        self._count, self._make = count, make
        self._last: tuple[int, FFN] | None = None

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, j):  # type: ignore[override]
        if isinstance(j, slice):
            return [self[i] for i in range(*j.indices(self._count))]
        if not -self._count <= j < self._count:
            raise IndexError(j)
        j %= self._count
        if self._last is None or self._last[0] != j:
            self._last = (j, self._make(j))
        return self._last[1]


@dataclass(frozen=True)
class MoELayer:
    """Routed experts behind a router, plus always-on shared experts.

    router: (E, H). A token's output is sum over its top-k experts of weight * expert(x),
    the weights given by `scoring`, plus the sum of the shared experts' outputs.
    """

    experts: Sequence[FFN]
    router: torch.Tensor
    topk: int
    shared: Sequence[FFN] = field(default_factory=tuple)
    scoring: Scoring = Scoring.SOFTMAX
    output_bias: torch.Tensor | None = None  # (H,) added once to the block output (a split FFN's down bias)

    @property
    def inactive_params(self) -> int:
        """Parameters a token does not use: the experts it is not routed to (PeerLayer has its own)."""
        return (len(self.experts) - self.topk) * sum(t.numel() for t in self.experts[0].tensors().values())

    def map(self, fn: Callable[[str, torch.Tensor], torch.Tensor]) -> MoELayer:
        """Every weight through fn(role, tensor), as FFN.map; the router's role is "router"."""
        bias = None if self.output_bias is None else fn("output_bias", self.output_bias)
        return replace(self, experts=[e.map(fn) for e in self.experts], router=fn("router", self.router),
                       shared=[s.map(fn) for s in self.shared], output_bias=bias)


def seed_for(seed: int, *parts: object) -> int:
    """A stable 63-bit seed for one (layer, expert, purpose): results do not depend on order."""
    digest = hashlib.sha256(repr((seed, *parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def generator(seed: int, *parts: object) -> torch.Generator:
    return torch.Generator().manual_seed(seed_for(seed, *parts))


def make_router(num_experts: int, hidden: int, spec: Spec, like: torch.Tensor, layer: int) -> torch.Tensor:
    """A fresh router (E, H) in the dtype and device of `like`."""
    if spec.router_init is RouterInit.ZEROS or like.is_meta:
        return torch.zeros(num_experts, hidden, dtype=like.dtype, device=like.device)
    weights = torch.randn(num_experts, hidden, generator=generator(spec.seed, layer, "router"))
    return (weights * spec.router_std).to(like.dtype)


def add_noise(ffn: FFN, std: float, gen: torch.Generator) -> FFN:
    """Gaussian noise of the given std on every weight matrix (biases untouched)."""
    if std == 0 or ffn.up.is_meta:
        return ffn
    return ffn.map(lambda role, t: t if "bias" in role else t + (torch.randn(t.shape, generator=gen) * std).to(t.dtype))


def drop_upcycle(ffn: FFN, ratio: float, gen: torch.Generator) -> FFN:
    """Drop-Upcycling: re-initialise a random share of intermediate neurons.

    The same neuron indices are redrawn in gate, up (rows) and down (columns), from a normal
    distribution with the mean and std of the weights being replaced.
    """
    count = int(round(ratio * ffn.intermediate_size))
    if count == 0 or ffn.up.is_meta:
        return ffn
    index = torch.randperm(ffn.intermediate_size, generator=gen)[:count]

    def redraw(role: str, t: torch.Tensor) -> torch.Tensor:
        if role == "down_bias":
            return t
        t = t.clone()
        old = t[:, index] if role == "down" else t[index]
        new = torch.randn(old.shape, generator=gen) * old.float().std() + old.float().mean()
        if role == "down":
            t[:, index] = new.to(t.dtype)
        else:
            t[index] = new.to(t.dtype)
        return t

    return ffn.map(redraw)


def check_divisible(intermediate: int, granularity: int) -> None:
    """Pieces must be equal; the Spec cannot check this (it does not know I), the first layer read can."""
    if intermediate % granularity:
        raise MoeifyError(f"--granularity {granularity} does not divide the intermediate size {intermediate}; "
                          f"choose a divisor of {intermediate}")


def pieces(ffn: FFN, granularity: int) -> list[FFN]:
    """Cut an FFN into `granularity` contiguous pieces of I/G neurons; their outputs sum to the FFN's.

    The down bias would be counted G times, so each piece carries 1/G of it.
    """
    if granularity == 1:
        return [ffn]
    check_divisible(ffn.intermediate_size, granularity)
    size = ffn.intermediate_size // granularity
    cut = [ffn.neurons(torch.arange(g * size, (g + 1) * size)) for g in range(granularity)]
    if ffn.down_bias is None:
        return cut
    return [replace(p, down_bias=p.down_bias / granularity) for p in cut]


def upcycle(ffn: FFN, spec: Spec, layer: int) -> MoELayer:
    """Copy a dense FFN into experts so the MoE computes exactly what the FFN did (before noise).

    Routed weights sum to 1 over the chosen experts, so copies reproduce the FFN. With shared
    experts, routed and shared outputs are each scaled by 1/(S+1) so their sum is the FFN again.
    With granularity G, each copy is cut into G pieces that share one router row (a virtual
    group, always chosen together); the renormalised weight of each piece is then 1/G of its
    copy's, which the down projection scaled by G undoes.
    """
    G, S = spec.granularity, spec.shared_experts
    share = 1.0 / (S + 1)
    hidden = ffn.hidden_size

    def expert(j: int) -> FFN:
        copy, piece = divmod(j, G)
        gen = generator(spec.seed, layer, "expert", copy)
        base = drop_upcycle(ffn, spec.drop_ratio, gen)
        base = add_noise(base, spec.noise, gen)
        return pieces(base, G)[piece].scaled(G * share)

    plain = spec.noise == 0 and spec.drop_ratio == 0
    if plain:  # identical experts: compute each piece once, reuse it for every copy
        shared_pieces = [p.scaled(G * share) for p in pieces(ffn, G)]
        experts: Sequence[FFN] = [shared_pieces[j % G] for j in range(spec.routed_experts)]
    else:
        experts = LazyExperts(spec.routed_experts, expert)
    router = make_router(spec.experts, hidden, spec, ffn.up, layer).repeat_interleave(G, dim=0)
    return MoELayer(experts=experts, router=router, topk=spec.active_experts, shared=[ffn.scaled(share)] * S)
