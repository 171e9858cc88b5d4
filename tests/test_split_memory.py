"""Split planning in less memory computes exactly what the whole-matrix float32/float64 path did.

The memory cuts (co-activation features a block of rows at a time, the FFN kept in the source's
dtype while planning) must not move a single bit of the partition or the routers.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from moeify.calibration import LayerStats
from moeify.partition import partition
from moeify.spec import Mode, Partition, Spec, SplitRouter
from moeify.split import fitted_router, plan_layer
from moeify.transforms import FFN, generator
from tests.fixtures import make_tiny

H, I = 16, 48


def _stats() -> LayerStats:
    """Statistics of 200 random tokens: inputs (T, H) and contributions (T, I), some neurons silent."""
    gen = torch.Generator().manual_seed(0)
    stats = LayerStats(H, I, coactivation=True)
    c = torch.rand(200, I, generator=gen) ** 3
    c[:, 5] = 0  # a dead neuron: its norm is clamped, not divided by zero
    stats.update(torch.randn(200, H, generator=gen), c)
    return stats


def _features_as_before(stats: LayerStats, neurons: torch.Tensor) -> torch.Tensor:
    """The old computation: one float64 copy of the (sub)matrix divided whole, then float32 (as k-means took it)."""
    sub = stats.cc[neurons][:, neurons].double()
    norms = sub.diagonal().clamp_min(1e-12).sqrt()
    return sub.div_(norms[:, None]).div_(norms[None, :]).float()


def _ffn(dtype: torch.dtype) -> FFN:
    gen = torch.Generator().manual_seed(1)
    return FFN(gate=torch.randn(I, H, generator=gen).to(dtype), up=torch.randn(I, H, generator=gen).to(dtype),
               down=torch.randn(H, I, generator=gen).to(dtype))


@pytest.mark.parametrize("rows", [1, 7, 48, 512])
@pytest.mark.parametrize("subset", [False, True])
def test_coactivation_features_in_row_blocks_equal_the_whole_matrix_bit_for_bit(rows, subset):
    stats = _stats()
    neurons = torch.tensor([0, 3, 5, 9, 17, 20, 33, 47]) if subset else torch.arange(I)
    got = stats.coactivation_features(neurons, rows=rows)
    assert got.dtype == torch.float32 and got.shape == (len(neurons), len(neurons))
    assert torch.equal(got, _features_as_before(stats, neurons))


@pytest.mark.parametrize("shared", [0, 2])
def test_activation_plan_is_bit_identical_to_the_whole_matrix_plan(shared):
    stats = _stats()
    spec = Spec(mode=Mode.SPLIT, experts=1, granularity=6, topk=2, shared_experts=shared,
                partition=Partition.ACTIVATION, split_router=SplitRouter.FIT)
    order = stats.hot.argsort(descending=True, stable=True)
    rest = order[shared * 8:].sort().values if shared else torch.arange(I)
    expected = partition(Partition.ACTIVATION, rest, 6 - shared, generator(0, 3, "partition"),
                         features=_features_as_before(stats, rest))
    plan = plan_layer(_ffn(torch.bfloat16), spec, 3, stats)
    assert stats.cc is None  # used up by the partition: k-means' copy of the features takes its place
    assert all(torch.equal(a, b) for a, b in zip(plan.groups, expected, strict=True))
    assert torch.equal(plan.router, fitted_router(stats, expected))


@pytest.mark.parametrize("router", [SplitRouter.CENTROID, SplitRouter.REPRESENTATIVE])
@pytest.mark.parametrize("kind", [Partition.CLUSTER, Partition.RANDOM])
def test_planning_in_the_source_dtype_equals_planning_on_a_float32_copy(kind, router):
    spec = Spec(mode=Mode.SPLIT, experts=1, granularity=4, topk=2, partition=kind, split_router=router)
    bf16 = _ffn(torch.bfloat16)
    narrow = plan_layer(bf16, spec, 0)
    wide = plan_layer(bf16.map(lambda role, t: t.float()), spec, 0)
    assert all(torch.equal(a, b) for a, b in zip(narrow.groups, wide.groups, strict=True))
    assert narrow.router.dtype == torch.float32 and torch.equal(narrow.router, wide.router)


@pytest.mark.parametrize("rows", [1, 5, 512])
def test_unit_rows_in_place_equal_normalize_bit_for_bit(rows):
    from moeify.partition import _unit_rows_

    x = torch.rand(37, 11, generator=torch.Generator().manual_seed(2)) ** 3
    x[4] = 0  # a zero row stays zero, as normalize's clamped denominator leaves it
    expected = torch.nn.functional.normalize(x, dim=1)
    assert _unit_rows_(x, rows=rows) is x and torch.equal(x, expected)


CHILD = r"""
import ctypes, sys, torch

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "layerwise":
    from moeify.layerwise import LayerwiseModel

    LayerwiseModel(sys.argv[2])
big = torch.empty(8 << 20, dtype=torch.uint8)
del big  # glibc's own rule: the mmap threshold rises to the size of a freed mapped block
before = libc.mallinfo2().hblks
block = torch.empty(2 << 20, dtype=torch.uint8)
print(libc.mallinfo2().hblks - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_running_layer_by_layer_maps_megabyte_blocks_of_their_own(tmp_path):
    # A 2 MB temporary after an 8 MB one: glibc would take it from the heap, where a layer's
    # per-batch temporaries pile up (fragmentation); a map of its own goes back when freed.
    model = make_tiny("llama", tmp_path / "tiny")
    mapped = {how: subprocess.run([sys.executable, "-c", CHILD, how, str(model)], capture_output=True, text=True,
                                  check=True).stdout.strip() for how in ("plain", "layerwise")}
    assert mapped == {"plain": "0", "layerwise": "1"}
