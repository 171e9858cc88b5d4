"""Upcycle SmolLM2-135M (float32, 538 MB) to 8 experts and compare with `cp` of the same bytes.

Each job runs in its own process so its peak RSS is its own (from wait4). Runs alternate
moeify / cp and the medians are reported, so machine noise hits both sides alike.

    python benchmarks/upcycle.py [--runs 3] [--experts 8] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Each job as it returns, then again until its bytes are on disk (sync): on this machine the page
# cache absorbs the whole output, so the first figure measures memory copies, the second the disk.
JOBS = ("moeify upcycle", "cp (same bytes)", "moeify upcycle + sync", "cp (same bytes) + sync", "moeify start-up")

# The parent stays light (no torch import): a forked child's peak RSS starts from its parent's.
FETCH = "from moeify.source import fallback_smollm2; print(fallback_smollm2(notify=lambda line: None))"


def timed(cmd: list[str], durable: bool = False) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of one child process; durable: until its bytes are on disk."""
    os.sync()  # start each job with no dirty pages left over from the previous one
    started = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    if durable:
        os.sync()
    seconds = time.perf_counter() - started
    if status != 0:
        sys.exit(f"{cmd[0]} failed: {child.stderr.read().decode()[-2000:]}")
    return seconds, usage.ru_maxrss / 1024


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()

    source = Path(subprocess.run([sys.executable, "-c", FETCH], check=True, capture_output=True,
                                 text=True).stdout.strip())
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)  # mkdtemp wants its parent to exist
    work = Path(tempfile.mkdtemp(prefix="moeify-bench-", dir=args.workdir))
    out, copy = work / "out", work / "copy"
    moeify = [sys.executable, "-m", "moeify.cli", "upcycle", str(source), "--experts", str(args.experts),
              "--topk", "2", "--output", str(out)]
    # What any moeify process pays before its first byte: the interpreter, torch and transformers.
    startup = [sys.executable, "-c", "import moeify.cli, moeify.targets.mixtral"]
    rows: dict[str, list[tuple[float, float]]] = {name: [] for name in JOBS}
    try:
        for _ in range(args.runs):
            for durable, suffix in ((False, ""), (True, " + sync")):
                shutil.rmtree(out, ignore_errors=True)  # deleting happens outside the clock for both jobs
                rows["moeify upcycle" + suffix].append(timed(moeify, durable))
                shutil.rmtree(copy, ignore_errors=True)
                copy.mkdir()
                shards = sorted(str(p) for p in out.glob("*.safetensors"))
                rows["cp (same bytes)" + suffix].append(timed(["cp", *shards, str(copy)], durable))
            rows["moeify start-up"].append(timed(startup))
        size = folder_bytes(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"source {folder_bytes(source) / 1e6:.0f} MB float32 -> {args.experts} experts, "
          f"{size / 1e6:.0f} MB written; median of {args.runs} runs")
    print(f"{'job':<25} {'wall s':>8} {'peak RSS MB':>12} {'MB/s':>8}")
    medians = {}
    for job, samples in rows.items():
        wall = statistics.median(s for s, _ in samples)
        rss = statistics.median(r for _, r in samples)
        medians[job] = wall
        rate = f"{size / 1e6 / wall:>8.0f}" if job != "moeify start-up" else f"{'-':>8}"
        print(f"{job:<25} {wall:>8.2f} {rss:>12.0f} {rate}")
    moeify, cp, start = medians["moeify upcycle"], medians["cp (same bytes)"], medians["moeify start-up"]
    print(f"time ratio moeify / cp: {moeify / cp:.2f}x; without start-up: {(moeify - start) / cp:.2f}x; "
          f"to bytes on disk (+ sync): {medians['moeify upcycle + sync'] / medians['cp (same bytes) + sync']:.2f}x")


if __name__ == "__main__":
    main()
