"""Neuron partitions: which intermediate neurons of an FFN go into which expert.

Every partition here is balanced (all parts the same size, so experts stack into one shape)
and a true partition (each neuron in exactly one part). Parts are index tensors into the
FFN's intermediate dimension, each sorted, so `FFN.neurons(part)` cuts an expert out.
"""

from __future__ import annotations

import torch

from moeify.errors import MoeifyError
from moeify.spec import Partition


def contiguous(neurons: torch.Tensor, parts: int) -> list[torch.Tensor]:
    """Neurons in their given order, cut into equal runs."""
    return [p.clone() for p in _equal_chunks(neurons, parts)]


def random(neurons: torch.Tensor, parts: int, gen: torch.Generator) -> list[torch.Tensor]:
    """A seeded random permutation, cut into equal parts."""
    shuffled = neurons[torch.randperm(len(neurons), generator=gen)]
    return [p.sort().values for p in _equal_chunks(shuffled, parts)]


def clustered(neurons: torch.Tensor, features: torch.Tensor, parts: int, gen: torch.Generator,
              iters: int = 25) -> list[torch.Tensor]:
    """Balanced k-means (cosine) over one feature row per neuron.

    neurons: (N,) indices; features: (N, D), row n describing neurons[n] (float32 ones are
    normalised in place, see balanced_kmeans).
    """
    labels = balanced_kmeans(features, parts, gen, iters)
    return [neurons[labels == c].sort().values for c in range(parts)]


def balanced_kmeans(points: torch.Tensor, parts: int, gen: torch.Generator, iters: int = 25) -> torch.Tensor:
    """Labels (N,) in 0..parts-1, each label used exactly N/parts times.

    points: (N, D). Float32 points are scaled to unit rows in place: they are made for the
    clustering, and a second (N, N) copy of co-activation rows is 127 MB at N = 5632.
    Cosine k-means whose assignment step is balanced greedily: (point, cluster) pairs are taken
    in order of similarity while the cluster has room. Greedy is not the optimal transport
    solution, but it keeps clusters equal and tight enough, in O(N·parts·log) per step.
    """
    n = len(points)
    capacity = n // parts
    x = _unit_rows_(points.float())
    centroids = x[torch.randperm(n, generator=gen)[:parts]]
    labels = torch.full((n,), -1, dtype=torch.long)
    for _ in range(iters):
        new = _balanced_assign(x @ centroids.T, capacity)
        if torch.equal(new, labels):
            break
        labels = new
        sums = torch.nn.functional.one_hot(labels, parts).T.to(x.dtype) @ x  # a matmul: index_add_ is slow here
        centroids = torch.nn.functional.normalize(sums, dim=1)
    return labels


def _unit_rows_(x: torch.Tensor, rows: int = 512) -> torch.Tensor:
    """x (N, D) with every row scaled to length 1, in place, a block of rows at a time.

    Bit for bit what torch.nn.functional.normalize(x, dim=1) returns, without its (N, D) result.
    """
    for block in x.split(rows):
        block.div_(block.norm(2, dim=1, keepdim=True).clamp_min(1e-12))
    return x


def _balanced_assign(similarity: torch.Tensor, capacity: int) -> torch.Tensor:
    """Balanced assignment of N points to K clusters of `capacity` points each, in at most K+1 rounds.

    similarity: (N, K). Each round, every unplaced point proposes its most similar cluster that
    still has room, and each cluster accepts its most similar proposers up to its room. A
    greedy, not the optimal transport plan, but vectorised: clustering 1536 neurons is instant.
    """
    n, k = similarity.shape
    labels = torch.full((n,), -1, dtype=torch.long)
    room = torch.full((k,), capacity, dtype=torch.long)
    sim = similarity.clone()
    while (free := (labels < 0).nonzero().squeeze(1)).numel():
        sim[:, room == 0] = -torch.inf
        best = sim[free].max(dim=1)
        order = best.values.argsort(descending=True)  # strongest proposals first...
        order = order[best.indices[order].argsort(stable=True)]  # ...grouped by cluster
        cluster = best.indices[order]
        counts = torch.bincount(cluster, minlength=k)
        rank = torch.arange(len(order)) - (counts.cumsum(0) - counts)[cluster]
        accepted = rank < room[cluster]
        labels[free[order[accepted]]] = cluster[accepted]
        room -= torch.bincount(cluster[accepted], minlength=k)
    return labels


def _equal_chunks(neurons: torch.Tensor, parts: int) -> list[torch.Tensor]:
    if parts < 1 or len(neurons) % parts:
        raise MoeifyError(f"cannot cut {len(neurons)} neurons into {parts} equal experts; "
                          f"choose a granularity that divides the intermediate size")
    return list(neurons.chunk(parts))


def partition(kind: Partition, neurons: torch.Tensor, parts: int, gen: torch.Generator,
              features: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Cut `neurons` into `parts` equal groups the way `kind` says.

    features: (N, D) rows for the neurons, required by cluster and activation (which differ
    only in what the rows describe: weights, or co-activation on calibration text).
    """
    _equal_chunks(neurons, parts)  # the size check, with its message, for every kind
    if kind is Partition.CONTIGUOUS:
        return contiguous(neurons, parts)
    if kind is Partition.RANDOM:
        return random(neurons, parts, gen)
    assert features is not None and len(features) == len(neurons), "clustering needs one feature row per neuron"
    return clustered(neurons, features, parts, gen)


def is_balanced_partition(parts: list[torch.Tensor], size: int) -> bool:
    """True when parts cover 0..size-1 exactly once and all have the same length."""
    together = torch.cat(parts)
    return len({len(p) for p in parts}) == 1 and torch.equal(together.sort().values, torch.arange(size))
