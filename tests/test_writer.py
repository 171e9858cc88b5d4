"""The streaming writer's output bytes: pinned, so a faster writer cannot change a single byte.

The source is a tiny llama whose weights are a fixed function of their position (no random
initialisation), and every conversion below uses a fixed seed; the sha256 of each weight file
was taken with the writer as it was before it was made faster (commit bbef1b9).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moeify import checkpoint
from moeify.checkpoint import BLOCK, PlannedTensor, write_shards
from moeify.errors import MoeifyError
from tests.fixtures import make_tiny, run_cli

O_DIRECT = getattr(os, "O_DIRECT", 0)

CASES = [  # conversions covering clones, casts, shards, noise, fine experts, remote packing
    ("upcycle", "--experts", "4", "--topk", "2"),
    ("upcycle", "--experts", "3", "--topk", "1", "--dtype", "bfloat16", "--max-shard-size", "40KB"),
    ("upcycle", "--experts", "4", "--topk", "2", "--noise", "0.01", "--drop-ratio", "0.5", "--seed", "3"),
    ("upcycle", "--experts", "2", "--topk", "2", "--granularity", "4", "--shared-experts", "1",
     "--format", "remote"),
    ("upcycle", "--experts", "4", "--topk", "2", "--moe-layers", "every:2", "--format", "native",
     "--router-init", "zeros", "--max-shard-size", "60KB"),
]

# (source dtype, case number) -> weights_digest; regenerate only for a deliberate format change, never for speed.
PINNED: dict[tuple[str, int], str] = {
    ("float32", 0): "9849c1f37430829af0f3a3ea1249d56afa3182b3d4023e9f5f880b0a3000c602",
    ("float32", 1): "ebfcfb6ed6d83f478a6288a7351d81364a55c59f32d65862326737d2b5a3050c",
    ("float32", 2): "40e46c6d1cec775465f0a6e82fab590ab5c6262f2be54375e1de74148a7b3a73",
    ("float32", 3): "9381fec7cf04d2df060ef5510145dc54fcef742ac5544f668b3ae4234484dd92",
    ("float32", 4): "078066b056462848ecad14cf54bb833293922ad35402f1e4a129bb0d8446896c",
    ("bfloat16", 0): "f412601337f0ab8258e9a843be62df8374934f946518be41652215678a0b1a9e",
    ("bfloat16", 1): "ebfcfb6ed6d83f478a6288a7351d81364a55c59f32d65862326737d2b5a3050c",
    ("bfloat16", 2): "878e970dcb38438d55dbeb6d742b6d80853cefc7bd8521ed32dfbfa0e8540669",
    ("bfloat16", 3): "45711c3cbb441a9040ee9a7585d3f0f277d7e48ec653bc8d617c5238d28c36a8",
    ("bfloat16", 4): "d9a1ba05dfe74c1a00244011f04c626eeb8da8d7c0c41b7add2cb2d6fd81c733",
}


def fixed_llama(folder: Path, dtype: torch.dtype) -> Path:
    """A tiny llama whose every weight is sin of its position, scaled: the same bytes everywhere."""
    make_tiny("llama", folder)
    path = folder / "model.safetensors"
    tensors = load_file(path)
    fixed = {}
    for i, (name, t) in enumerate(sorted(tensors.items())):
        values = torch.sin(torch.arange(t.numel(), dtype=torch.float64) * 0.37 + i) * 0.05
        fixed[name] = (values + (1.0 if name.endswith("norm.weight") else 0.0)).reshape(t.shape).to(dtype)
    save_file(fixed, path, {"format": "pt"})
    return folder


def weights_digest(folder: Path) -> str:
    """One sha256 over every weight file's name and sha256, the index included."""
    files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.index.json"))
    lines = "".join(f"{f.name} {hashlib.sha256(f.read_bytes()).hexdigest()}\n" for f in files)
    return hashlib.sha256(lines.encode()).hexdigest()


# How the shards are written: O_DIRECT (where the filesystem has it) or through the page cache, in
# 64 MiB chunks (every file here fits in one) or in chunks of three blocks (tensors straddle chunks).
WRITERS = {"direct": (True, None), "direct-small-chunks": (True, 3 * BLOCK), "buffered-small-chunks": (False, 3 * BLOCK)}


@pytest.fixture(params=list(WRITERS))
def writer(request, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Set the writer up as named; yield the open() flags of every shard it opens."""
    direct, chunk = WRITERS[request.param]
    monkeypatch.setattr(checkpoint, "DIRECT", direct and checkpoint.DIRECT)
    if chunk:
        monkeypatch.setattr(checkpoint, "CHUNK", chunk)
    flags, real_open = [], os.open

    def recording_open(path, flag, *args):
        if str(path).endswith(".safetensors"):
            flags.append(flag)
        return real_open(path, flag, *args)

    monkeypatch.setattr(checkpoint.os, "open", recording_open)
    return flags


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("case", CASES, ids=lambda case: " ".join(case[1:]))
def test_output_bytes_are_pinned(tmp_path: Path, case: tuple[str, ...], dtype: torch.dtype, writer: list[int]):
    source = fixed_llama(tmp_path / "src", dtype)
    out = tmp_path / "out"
    assert run_cli(*case, source, "--output", out) == 0
    assert weights_digest(out) == PINNED[(str(dtype).removeprefix("torch."), CASES.index(case))]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # nothing staged left beside it
    assert writer and all(bool(flag & O_DIRECT) is checkpoint.DIRECT for flag in writer)


def plan_of(tensors: dict[str, torch.Tensor]) -> list[PlannedTensor]:
    return [PlannedTensor(n, tuple(t.shape), t.dtype, lambda t=t: t) for n, t in tensors.items()]


def straddling_tensors() -> dict[str, torch.Tensor]:
    """Tensors of odd sizes, some the same object many times (as upcycled experts are)."""
    gen = torch.Generator().manual_seed(4)
    expert = torch.randn(37, 29, generator=gen)
    tensors = {f"e{j}": expert for j in range(6)}
    return tensors | {"odd": torch.randn(1001, generator=gen).to(torch.bfloat16), "e6": expert.T, "none": torch.empty(0)}


@pytest.mark.skipif(not checkpoint.DIRECT, reason="the platform has no O_DIRECT")
def test_a_filesystem_refusing_direct_writes_gets_buffered_ones(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Some filesystems accept O_DIRECT at open and refuse the writes (EINVAL): the same bytes go buffered."""
    tensors = straddling_tensors()
    (tmp_path / "expected").mkdir()
    write_shards(plan_of(tensors), tmp_path / "expected", "1GB")
    monkeypatch.setattr(checkpoint, "CHUNK", 2 * BLOCK)
    real_pwrite, refused = os.pwrite, []

    def pwrite(fd: int, data, offset: int) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & O_DIRECT:
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(checkpoint.os, "pwrite", pwrite)
    (tmp_path / "got").mkdir()
    write_shards(plan_of(tensors), tmp_path / "got", "1GB")
    assert refused == [0]  # refused once, then never asked again
    assert weights_digest(tmp_path / "got") == weights_digest(tmp_path / "expected")
    got = load_file(tmp_path / "got" / "model.safetensors")
    assert all(torch.equal(got[n], t) for n, t in tensors.items())


def test_a_failing_tensor_stops_the_writer_cleanly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A tensor that cannot be produced ends the write: the error goes up, no write thread or descriptor is left."""
    monkeypatch.setattr(checkpoint, "CHUNK", 2 * BLOCK)
    tensors = straddling_tensors()
    plan = plan_of(tensors)

    def unreadable() -> torch.Tensor:
        raise MoeifyError("the source vanished")

    plan.insert(5, PlannedTensor("bad", (3,), torch.float32, unreadable))
    fds = set(os.listdir("/proc/self/fd"))
    with pytest.raises(MoeifyError, match="vanished"):
        write_shards(plan, tmp_path, "1GB")
    assert set(os.listdir("/proc/self/fd")) == fds
    assert not [t for t in threading.enumerate() if t.name.startswith("moeify-writer")]
