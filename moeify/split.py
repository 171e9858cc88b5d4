"""Split transforms: cut an FFN (or every expert of a MoE layer) into finer experts.

Dense FFN -> G pieces made of disjoint sets of intermediate neurons. The pieces' outputs sum
to the FFN's, so with unit combine weights (each selected piece weighs 1) selecting all of
them is the dense FFN exactly, and selecting fewer is the partial sum of the chosen pieces.
Shared experts are carved from the neurons most often strongly active on calibration text.
With spec.refit the down projection is refitted to the chosen pieces instead (moeify.refit):
fewer pieces then stand in for the rest on text like the calibration text.

MoE layer -> every expert cut into G contiguous pieces sharing its router row (a virtual
group, chosen together), top-k multiplied by G: exact, as in granular upcycling.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from moeify.calibration import LayerStats
from moeify.partition import partition
from moeify.refit import refitted_down
from moeify.spec import Partition, Spec, SplitRouter
from moeify.transforms import FFN, MoELayer, Scoring, check_divisible, generator, pieces

RIDGE = 1e-2  # least-squares routers: ridge relative to the mean input energy (X^T X is ill-conditioned)


def needs_calibration(spec: Spec) -> bool:
    """Whether a dense split of this spec reads calibration statistics.

    Not when every piece is routed and active: no grouping or router can change what the model
    computes then, so their weight-only counterparts stand in (see _uncalibrated).
    """
    if everything_active(spec):
        return False
    return (spec.partition is Partition.ACTIVATION or spec.split_router is SplitRouter.FIT
            or spec.shared_experts > 0 or spec.refit)


def everything_active(spec: Spec) -> bool:
    """Whether every piece runs for every token (none shared, top-k = G): the dense model exactly."""
    return spec.shared_experts == 0 and spec.topk >= spec.granularity


def _uncalibrated(spec: Spec) -> Spec:
    """The spec with weight-only grouping and routers in place of the calibrated ones."""
    partition = Partition.CLUSTER if spec.partition is Partition.ACTIVATION else spec.partition
    router = SplitRouter.CENTROID if spec.split_router is SplitRouter.FIT else spec.split_router
    return replace(spec, partition=partition, split_router=router)


@dataclass(frozen=True)
class LayerPlan:
    """What calibration decides for one FFN: its neuron groups and the router that picks them."""

    shared: list[torch.Tensor]  # neuron indices of each shared expert
    groups: list[torch.Tensor]  # neuron indices of each routed expert
    router: torch.Tensor  # (E, H) float32
    down: torch.Tensor | None = None  # (H, I) the FFN's down projection refitted to these pieces (spec.refit)


def plan_layer(ffn: FFN, spec: Spec, layer: int, stats: LayerStats | None = None,
               act: Callable | None = None) -> LayerPlan:
    """Group the neurons and build the router; stats are needed when needs_calibration(spec), and
    with spec.refit stats holding the FFN's inputs and act, the FFN's activation.

    The activation partition uses up the co-activation sums: stats.cc is None afterwards.
    """
    check_divisible(ffn.intermediate_size, spec.granularity)
    if stats is None and everything_active(spec):
        spec = _uncalibrated(spec)
    shared, groups = neuron_groups(ffn, spec, layer, stats)
    router = route(ffn, groups, spec, stats)
    if not spec.refit:
        return LayerPlan(shared, groups, router)
    assert stats is not None and stats.inputs is not None and act is not None, "a refit needs the FFN's inputs"
    down = refitted_down(ffn, act, shared, groups, router, spec.topk, stats.inputs)
    stats.inputs = None  # used up
    return LayerPlan(shared, groups, router, down)


def split_ffn(ffn: FFN, spec: Spec, layer: int, plan: LayerPlan | None = None) -> MoELayer:
    """A dense FFN as spec.granularity equal experts (spec.shared_experts of them always on).

    plan: the layer's grouping and router from calibration, when needs_calibration(spec).
    ffn may hold meta tensors (planning): the grouping is then contiguous, only shapes matter.
    """
    if plan is None or ffn.up.is_meta:
        plan = plan_layer(ffn, replace(spec, refit=False), layer)
    if plan.down is not None:
        ffn = replace(ffn, down=plan.down.to(ffn.down.dtype))
    experts = [_piece(ffn, g) for g in plan.groups]
    return MoELayer(experts=experts, router=plan.router.to(ffn.up.dtype), topk=spec.topk,
                    shared=[_piece(ffn, s) for s in plan.shared], scoring=Scoring.UNIT, output_bias=ffn.down_bias)


def neuron_groups(ffn: FFN, spec: Spec, layer: int, stats: LayerStats | None
                  ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(shared, routed) neuron index groups, each of I/G neurons, together a partition of 0..I-1."""
    G, S, I = spec.granularity, spec.shared_experts, ffn.intermediate_size
    size = I // G
    if ffn.up.is_meta:
        all_ = list(torch.arange(I).chunk(G))
        return all_[:S], all_[S:]
    if S:
        assert stats is not None, "shared experts are carved using calibration statistics"
        order = stats.hot.argsort(descending=True, stable=True)  # most often strongly active first
        shared = list(order[: S * size].sort().values.chunk(S))
        rest = order[S * size:].sort().values
    else:
        shared, rest = [], torch.arange(I)
    gen = generator(spec.seed, layer, "partition")
    return shared, partition(spec.partition, rest, G - S, gen, features=_features(ffn, spec, stats, rest))


def _features(ffn: FFN, spec: Spec, stats: LayerStats | None, neurons: torch.Tensor) -> torch.Tensor | None:
    """What clustering compares: weight rows (cluster) or co-activation rows (activation)."""
    if spec.partition is Partition.CLUSTER:
        return _input_rows(ffn)[neurons].float()
    if spec.partition is Partition.ACTIVATION:
        assert stats is not None, "the activation partition needs calibration statistics"
        features = stats.coactivation_features(neurons)
        stats.cc = None  # used up: k-means' normalised copy of the features takes its place (127 MB at I = 5632)
        return features
    return None


def _input_rows(ffn: FFN) -> torch.Tensor:
    """(I, H): the input weights that decide whether a neuron fires (gate, else up), in the FFN's dtype.

    Callers take their rows first and widen those to float32, not a float32 copy of the whole matrix.
    """
    return ffn.gate if ffn.gate is not None else ffn.up


def _piece(ffn: FFN, neurons: torch.Tensor) -> FFN:
    """The expert made of these neurons; its down bias is zero, the layer adds the real one once."""
    piece = ffn.neurons(neurons)
    return piece if piece.down_bias is None else replace(piece, down_bias=torch.zeros_like(piece.down_bias))


def route(ffn: FFN, groups: list[torch.Tensor], spec: Spec, stats: LayerStats | None) -> torch.Tensor:
    """A router (E, H) in float32 for experts made of these neuron groups."""
    if ffn.up.is_meta:
        return torch.zeros(len(groups), ffn.hidden_size, dtype=ffn.up.dtype, device="meta")
    if spec.split_router is SplitRouter.FIT:
        assert stats is not None, "a fitted router needs calibration statistics"
        return fitted_router(stats, groups)
    rows = _input_rows(ffn)
    return torch.stack([_centroid(rows[g].float(), spec.split_router) for g in groups])


def _centroid(rows: torch.Tensor, kind: SplitRouter) -> torch.Tensor:
    """The mean of an expert's input rows, or (representative) the row closest to that mean."""
    mean = rows.mean(0)
    if kind is SplitRouter.CENTROID:
        return mean
    return rows[torch.nn.functional.cosine_similarity(rows, mean[None], dim=1).argmax()]


def fitted_router(stats: LayerStats, groups: list[torch.Tensor]) -> torch.Tensor:
    """(E, H): ridge least squares X w_e ≈ s_e, s_e the expert's share of each token's contribution mass.

    Shares rather than raw mass: a router only ranks experts within a token, so the fit should
    not spend itself on how loud a token is overall. A share is a sum over the expert's neurons,
    so X^T s_e is a sum of columns of X^T S: one calibration pass serves every grouping.
    """
    H = stats.hidden
    xs = torch.stack([stats.xs[:, g].sum(1) for g in groups], dim=1)  # (H, E)
    ridge = RIDGE * stats.xx.diagonal().mean() * torch.eye(H, dtype=stats.xx.dtype)
    return torch.linalg.solve(stats.xx + ridge, xs).T.float()


def split_moe(moe: MoELayer, spec: Spec, layer: int) -> MoELayer:
    """Every expert of a MoE layer cut into G pieces that share its router row: exact.

    With softmax scoring each piece gets 1/G of its expert's weight (ties within a group are
    broken whole, since the rows are identical), which the down projection scaled by G undoes
    (renormalised over the top-k or not: the pieces' weights sum to their expert's); with unit
    scoring each piece weighs 1 and the G pieces sum to the expert, so nothing is scaled.
    Shared experts and the output bias are kept as they are.
    """
    G = spec.granularity
    for expert in moe.experts[:1]:
        check_divisible(expert.intermediate_size, G)
    scale = G if moe.scoring is Scoring.SOFTMAX else 1
    experts = [p.scaled(scale) for e in moe.experts for p in pieces(e, G)]
    return MoELayer(experts=experts, router=moe.router.repeat_interleave(G, dim=0), topk=spec.topk,
                    shared=moe.shared, scoring=moe.scoring, output_bias=moe.output_bias)
