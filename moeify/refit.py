"""Least-squares down projections for a split: the pieces a token selects, refitted to the whole FFN.

A split keeps each piece's neurons as they were, so a token that selects half the pieces gets
half the FFN's sum, and what the other half would have added is lost. On calibration text the
loss can be measured and mostly repaid: with each token's selection fixed (the router's top-k,
shared pieces always on), the layer's output is linear in the down projection, so the down
projection that best reproduces the dense FFN's output from the selected neurons alone is a
ridge least-squares solution over the calibration tokens. Neurons, grouping and routers stay as
calibrated; only the down projection changes (as post-training quantizers and pruners refit a
layer's output weights to its dense outputs).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from moeify.calibration import neuron_activations
from moeify.transforms import FFN

# Relative to the mean activation energy; pulls the fit towards the dense down projection. The best
# of 1e-3 to 1 on SmolLM2-135M with 6k and with 16k calibration tokens (a smaller one overfits 6k).
RIDGE = 0.1
CHUNK = 512  # tokens per update: bounds the (T, I) temporaries


def refitted_down(ffn: FFN, act: Callable, shared: list[torch.Tensor], groups: list[torch.Tensor],
                  router: torch.Tensor, topk: int, inputs: Iterable[torch.Tensor]) -> torch.Tensor:
    """The FFN's down projection (H, I) refitted so that each token's selected neurons reproduce its dense output.

    shared, groups: neuron indices of the shared and routed pieces; router (E, H); inputs: the
    FFN's calibration inputs, (T, H) float32 tensors. The ridge pulls towards the dense down
    projection, which also keeps neurons that calibration never selects as they were. The fit runs
    in float32 (one layer's FFN widened) and the result comes back in the FFN's own dtype.
    """
    dtype = ffn.down.dtype
    ffn = ffn.map(lambda role, t: t.float())
    down = ffn.down
    owner = _owners(ffn.intermediate_size, shared, groups)
    gram = torch.zeros(ffn.intermediate_size, ffn.intermediate_size, dtype=torch.float64)
    cross = torch.zeros(ffn.intermediate_size, ffn.hidden_size, dtype=torch.float64)
    for x in inputs:
        for part in x.split(CHUNK):
            active = neuron_activations(ffn, act, part)  # (T, I)
            target = active @ down.T  # the dense output, without its bias (the layer adds it whole)
            chosen = _selected(part @ router.T, topk)[:, owner]  # (T, I)
            features = active * chosen
            # Products in float32 (twice as fast), sums in float64 (many chunks add up).
            gram += features.T @ features
            cross += features.T @ target
    ridge = RIDGE * gram.diagonal().mean().clamp_min(1e-12)
    gram.diagonal().add_(ridge)
    cross.add_(down.T.double(), alpha=ridge)
    # Symmetric positive definite (the ridge sees to it): Cholesky, half the work of a general solve.
    return torch.cholesky_solve(cross, torch.linalg.cholesky(gram)).T.to(dtype)


def _owners(intermediate: int, shared: list[torch.Tensor], groups: list[torch.Tensor]) -> torch.Tensor:
    """(I,) the routed piece each neuron belongs to; shared neurons point at an extra column, E."""
    owner = torch.full((intermediate,), -1, dtype=torch.long)
    for piece in shared:
        owner[piece] = len(groups)
    for e, piece in enumerate(groups):
        owner[piece] = e
    assert (owner >= 0).all(), "shared and routed pieces must cover every neuron"
    return owner


def _selected(logits: torch.Tensor, topk: int) -> torch.Tensor:
    """(T, E + 1) bool: each token's top-k pieces, and the extra column of the shared neurons, always on."""
    chosen = torch.zeros(logits.shape[0], logits.shape[1] + 1, dtype=torch.bool)
    chosen.scatter_(1, logits.topk(topk, dim=1).indices, True)
    chosen[:, -1] = True
    return chosen
