"""Neuron partitions: balanced, true partitions, and clustering that finds real structure."""

from __future__ import annotations

import pytest
import torch

from moeify.errors import MoeifyError
from moeify.partition import balanced_kmeans, is_balanced_partition, partition
from moeify.spec import Partition


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("kind", list(Partition))
@pytest.mark.parametrize("size,parts", [(96, 4), (96, 8), (60, 12), (64, 64)])
def test_every_partition_is_balanced_and_covers_each_neuron_once(kind, size, parts):
    features = torch.randn(size, 16, generator=_gen(1))
    groups = partition(kind, torch.arange(size), parts, _gen(), features=features)
    assert len(groups) == parts
    assert is_balanced_partition(groups, size)
    assert all(torch.equal(g, g.sort().values) for g in groups)  # sorted: experts keep neuron order


@pytest.mark.parametrize("kind", list(Partition))
def test_partition_of_a_subset_uses_only_those_neurons(kind):
    neurons = torch.tensor([1, 3, 4, 8, 9, 10, 20, 21])
    groups = partition(kind, neurons, 4, _gen(), features=torch.randn(8, 5, generator=_gen(2)))
    assert sorted(torch.cat(groups).tolist()) == neurons.tolist()
    assert {len(g) for g in groups} == {2}


def test_contiguous_keeps_order_and_random_depends_on_the_seed():
    assert [g.tolist() for g in partition(Partition.CONTIGUOUS, torch.arange(6), 3, _gen())] == [[0, 1], [2, 3], [4, 5]]
    a = partition(Partition.RANDOM, torch.arange(64), 4, _gen(0))
    b = partition(Partition.RANDOM, torch.arange(64), 4, _gen(0))
    c = partition(Partition.RANDOM, torch.arange(64), 4, _gen(1))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_balanced_kmeans_recovers_planted_clusters():
    # Four tight clusters of 16 points around orthogonal directions, shuffled.
    centres = torch.eye(4, 12) * 5
    points = centres.repeat_interleave(16, 0) + 0.3 * torch.randn(64, 12, generator=_gen(3))
    order = torch.randperm(64, generator=_gen(4))
    labels = balanced_kmeans(points[order], 4, _gen(5))
    truth = torch.arange(4).repeat_interleave(16)[order]
    for c in range(4):  # each found cluster is exactly one planted cluster
        assert len(truth[labels == c].unique()) == 1
    assert torch.bincount(labels).tolist() == [16] * 4


def test_balanced_kmeans_stays_balanced_when_the_data_is_not():
    # 90% of the points in one blob: clusters must still be equal in size.
    points = torch.cat([torch.randn(54, 8, generator=_gen(6)) * 0.01 + 1, torch.randn(6, 8, generator=_gen(7))])
    labels = balanced_kmeans(points, 6, _gen())
    assert torch.bincount(labels, minlength=6).tolist() == [10] * 6


def test_a_size_that_does_not_divide_is_one_clear_error():
    with pytest.raises(MoeifyError, match="cannot cut 10 neurons into 4 equal experts"):
        partition(Partition.RANDOM, torch.arange(10), 4, _gen())


def test_is_balanced_partition_rejects_overlaps_gaps_and_unequal_parts():
    assert not is_balanced_partition([torch.tensor([0, 1]), torch.tensor([1, 2])], 4)
    assert not is_balanced_partition([torch.tensor([0, 1]), torch.tensor([3, 4])], 4)
    assert not is_balanced_partition([torch.tensor([0]), torch.tensor([1, 2, 3])], 4)
