"""How long the CLI takes to answer: `moeify --help`, `moeify split --help`, `moeify models` and
`moeify inspect` of a local config.json, next to `python -c pass` (the interpreter's floor).

    python benchmarks/cli.py [--runs 9] [--inspect DIR]

Each command runs --runs times as a fresh process, in turn with `python -c pass`, so machine noise
hits all alike; medians are reported. CPU seconds (user + system) are reported beside wall seconds:
on a busy machine wall time also counts the waiting, so the load average is printed too, and the
ratio to the floor is the figure to compare between runs. Bytecode is cached as for an installed
package (a warm-up run writes it under a temporary PYTHONPYCACHEPREFIX, whatever
PYTHONDONTWRITEBYTECODE says). Without --inspect, a Mistral-7B config.json as a person would write
it (no head_dim) is inspected. Target (issue 10): `moeify --help` within 0.3 s. The moeify measured
is the one `python -m moeify` finds from the current directory (the checkout, when run from its root).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MISTRAL_7B = {"model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000, "torch_dtype": "bfloat16"}
TARGET_SECONDS = 0.3


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall and CPU seconds of one run of argv."""
    before, start = _children_cpu(), time.perf_counter()
    subprocess.run(argv, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start, _children_cpu() - before


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def commands(inspected: str) -> dict[str, list[str]]:
    moeify = [sys.executable, "-m", "moeify"]
    return {"python -c pass": [sys.executable, "-c", "pass"], "moeify --help": [*moeify, "--help"],
            "moeify split --help": [*moeify, "split", "--help"], "moeify models": [*moeify, "models"],
            "moeify inspect CONFIG": [*moeify, "inspect", inspected]}


def measure(argvs: dict[str, list[str]], runs: int, env: dict[str, str]) -> dict[str, list[tuple[float, float]]]:
    for argv in argvs.values():  # warm-up: bytecode written, files in the page cache
        timed(argv, env)
    measured: dict[str, list[tuple[float, float]]] = {name: [] for name in argvs}
    for _ in range(runs):
        for name, argv in argvs.items():
            measured[name].append(timed(argv, env))
    return measured


def report(measured: dict[str, list[tuple[float, float]]], load: tuple[float, float]) -> None:
    floor_wall, floor_cpu = (statistics.median(m[i] for m in measured["python -c pass"]) for i in (0, 1))
    print(f"load average {load[0]:.2f} before, {load[1]:.2f} after ({os.cpu_count()} cores)")
    print(f"{'command':<24} {'wall s':>7} {'min s':>6} {'x floor':>8} {'cpu s':>6} {'x floor':>8}")
    for name, runs in measured.items():
        walls, cpus = [w for w, _ in runs], [c for _, c in runs]
        wall, cpu = statistics.median(walls), statistics.median(cpus)
        print(f"{name:<24} {wall:>7.3f} {min(walls):>6.3f} {wall / floor_wall:>8.1f} {cpu:>6.3f} "
              f"{cpu / floor_cpu:>8.1f}")
    help_wall = statistics.median(w for w, _ in measured["moeify --help"])
    print(f"moeify --help: {help_wall:.3f} s wall (target {TARGET_SECONDS} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--inspect", metavar="DIR", help="a model folder or config.json (default: Mistral-7B's)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="moeify-cli-") as work:
        inspected = args.inspect or _config_folder(Path(work))
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        env |= {"PYTHONPYCACHEPREFIX": str(Path(work) / "pycache"), "HF_HUB_OFFLINE": "1"}
        before = os.getloadavg()[0]
        measured = measure(commands(inspected), args.runs, env)
        report(measured, (before, os.getloadavg()[0]))


def _config_folder(work: Path) -> str:
    folder = work / "mistral-7b"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(MISTRAL_7B))
    return str(folder)


if __name__ == "__main__":
    main()
