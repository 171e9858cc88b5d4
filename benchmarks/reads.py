"""What reading a checkpoint's tensors costs: moeify's mapped reads next to a pread into a fresh buffer.

    python benchmarks/reads.py [--model DIR] [--rounds 5] [--ffn-only]

Every tensor of the checkpoint (or its FFN tensors) is read and copied once into a reused 64 MB
buffer, as the shard writer does, by `Checkpoint.read` (a copy-on-write map of the tensor's bytes)
and by the pread path it falls back to, in turn, --rounds times each; medians of wall and kernel
seconds are printed. "cached" rounds read from the page cache; "evicted" rounds first ask the
kernel to drop the files' pages (posix_fadvise DONTNEED), so the bytes come from the disk. glibc's
mmap threshold is set to 1 MB first, as a merge's gates set it (moeify.layerwise.map_large_blocks):
then every fresh buffer of 1 MB or more is a new zero-filled map. Without --model, the offline
SmolLM2-135M copy is read.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from moeify.checkpoint import Checkpoint, _pread
from moeify.layerwise import map_large_blocks

CHUNK = 64 * 2**20


def kernel_seconds() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_stime


def evict(ckpt: Checkpoint) -> None:
    for path in {info.path for info in ckpt.tensors.values()}:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_all(names: list[str], read: Callable[[str], torch.Tensor], sink: torch.Tensor) -> tuple[float, float]:
    """Wall and kernel seconds to read every tensor and copy its bytes into the sink."""
    wall, kernel = time.perf_counter(), kernel_seconds()
    for name in names:
        flat = read(name).reshape(-1).view(torch.uint8)
        for start in range(0, len(flat), CHUNK):
            piece = flat[start:start + CHUNK]
            sink[:len(piece)].copy_(piece)
    return time.perf_counter() - wall, kernel_seconds() - kernel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a safetensors model folder (default: SmolLM2-135M, offline)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--ffn-only", action="store_true", help="only the tensors of the MLP blocks")
    args = parser.parse_args()
    if args.model is None:
        from moeify.source import fallback_smollm2

        args.model = fallback_smollm2(notify=print)
    map_large_blocks()
    ckpt = Checkpoint(args.model)
    names = [n for n in ckpt.names() if not args.ffn_only or ".mlp." in n]
    total = sum(ckpt.info(n).nbytes for n in names)
    ways = {"mapped (Checkpoint.read)": ckpt.read, "pread into a fresh buffer": lambda n: _pread(ckpt.info(n))}
    sink = torch.empty(CHUNK, dtype=torch.uint8)
    print(f"{args.model.name}: {len(names)} tensors, {total / 1e9:.2f} GB; median of {args.rounds} rounds, alternating")
    for state in ("cached", "evicted"):
        got: dict[str, list[tuple[float, float]]] = {way: [] for way in ways}
        read_all(names, ckpt.read, sink)  # the page cache holds the files, for the cached rounds
        for _ in range(args.rounds):
            for way, read in ways.items():
                if state == "evicted":
                    evict(ckpt)
                got[way].append(read_all(names, read, sink))
        for way, runs in got.items():
            wall, kernel = (statistics.median(r[i] for r in runs) for i in (0, 1))
            print(f"{state:>8}  {way:<27} {wall:6.2f} s wall  {kernel:6.2f} s kernel  {total / 1e9 / wall:5.2f} GB/s")
        ours, theirs = (statistics.median(r[0] for r in runs) for runs in got.values())
        print(f"{state:>8}  pread / mapped: {theirs / ours:.2f}x the wall time")


if __name__ == "__main__":
    main()
