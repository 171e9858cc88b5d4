"""How long the CLI takes to answer: `moeify --help` (and a few other instant commands) next to `python -c pass`.

    python benchmarks/cli.py [--runs 7] [--inspect DIR]

Each command runs --runs times as a fresh process, alternating with `python -c pass` so machine
noise hits both alike; the medians are reported, and the difference is what moeify's imports cost.
CPU seconds (user + system) are reported too: on a busy machine wall time also counts the waiting.
Target: `moeify --help` within 0.3 s. With --inspect DIR, `moeify inspect DIR` is timed too.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import time


def timed(argv: list[str]) -> tuple[float, float]:
    """Wall and CPU seconds of one run of argv."""
    before, start = _children_cpu(), time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start, _children_cpu() - before


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--inspect", metavar="DIR", help="a model folder for `moeify inspect`")
    args = parser.parse_args()
    moeify = [sys.executable, "-m", "moeify"]
    commands = {"python -c pass": [sys.executable, "-c", "pass"], "moeify --help": [*moeify, "--help"],
                "moeify split --help": [*moeify, "split", "--help"], "moeify models": [*moeify, "models"]}
    if args.inspect:
        commands[f"moeify inspect {args.inspect}"] = [*moeify, "inspect", args.inspect]
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
    for _ in range(args.runs):
        for name, argv in commands.items():
            runs[name].append(timed(argv))
    baseline = statistics.median(wall for wall, _ in runs["python -c pass"])
    print(f"{'command':<40} {'median s':>9} {'min s':>7} {'over python':>12} {'cpu s':>6}")
    for name, measured in runs.items():
        walls = [wall for wall, _ in measured]
        median, cpu = statistics.median(walls), statistics.median(cpu for _, cpu in measured)
        print(f"{name:<40} {median:>9.3f} {min(walls):>7.3f} {median - baseline:>+12.3f} {cpu:>6.3f}")


if __name__ == "__main__":
    main()
