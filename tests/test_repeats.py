"""The writer copies repeated tensors in-kernel; the bytes must be the same either way."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

from moeify import checkpoint
from moeify.checkpoint import PlannedTensor, write_shards


def _plan(shared: torch.Tensor, other: torch.Tensor) -> list[PlannedTensor]:
    names = ["a", "b", "c", "d"]
    tensors = [shared, other, shared, shared]
    return [PlannedTensor(n, tuple(t.shape), t.dtype, lambda t=t: t) for n, t in zip(names, tensors)]


@pytest.mark.parametrize("kernel_copy", [True, False])
def test_repeated_tensor_written_identically(tmp_path, monkeypatch, kernel_copy):
    shared, other = torch.randn(64, 33), torch.randn(7)
    calls, copied = [], []
    real = os.copy_file_range

    def fake(*args):
        calls.append(args)
        if not kernel_copy:
            raise OSError("not supported")
        copied.append(real(*args))
        return copied[-1]

    monkeypatch.setattr(checkpoint.os, "copy_file_range", fake)
    write_shards(_plan(shared, other), tmp_path, "1GB")
    loaded = load_file(tmp_path / "model.safetensors")
    assert all(torch.equal(loaded[n], shared) for n in "acd")
    assert torch.equal(loaded["b"], other)
    assert len(calls) == 2  # c and d are repeats of a; b is new
    assert sum(copied) == (2 * shared.numel() * 4 if kernel_copy else 0)  # really copied in-kernel


def test_equal_but_distinct_tensors_are_not_treated_as_repeats(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint.os, "copy_file_range", lambda *a: pytest.fail("copied a distinct tensor"))
    x = torch.randn(5, 5)
    plan = [PlannedTensor(n, (5, 5), torch.float32, lambda: x.clone()) for n in ("a", "b")]
    write_shards(plan, tmp_path, "1GB")
    assert torch.equal(load_file(tmp_path / "model.safetensors")["b"], x)
