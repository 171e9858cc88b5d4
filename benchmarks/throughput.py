"""Upcycle a synthetic 1.1B Llama to 8 experts and compare with `cp -r` + `sync` of the same output.

The model (TinyLlama's shapes: hidden 2048, FFN 5632, 22 layers, 32 heads / 4 KV heads, vocab
32000, bf16 random weights, 2.2 GB) is made by the benchmark in the work folder; its upcycle
writes 12.9 GB. Each job runs in its own process (peak RSS from wait4) and is timed until its
bytes are on disk (sync); runs alternate moeify / cp, the previous output is deleted outside the
clock, and the medians are reported, so machine noise hits both sides alike.

    python benchmarks/throughput.py [--runs 3] [--experts 8] [--layers 22] [--workdir DIR]

Disk: the source plus two outputs (~28 GB at the defaults), all removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The 1.1B Llama's config.json (TinyLlama-1.1B's shapes).
CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
    "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4,
    "vocab_size": 32000, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "hidden_act": "silu", "tie_word_embeddings": False, "dtype": "bfloat16", "bos_token_id": 1,
    "eos_token_id": 2,
}

# Run in a child: the parent stays light (no torch import), as a forked child's peak RSS starts from
# its parent's. Tensors are made one at a time by the streaming writer, so this child stays small too.
MAKE = """
import json, math, sys, torch
from pathlib import Path
from moeify.checkpoint import PlannedTensor, write_shards
folder, config = Path(sys.argv[1]), json.loads(sys.argv[2])
h, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
kv = h // config["num_attention_heads"] * config["num_key_value_heads"]
shapes = {"model.embed_tokens.weight": (v, h)}
for i in range(config["num_hidden_layers"]):
    p = f"model.layers.{i}."
    shapes |= {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
               p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
               p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
               p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h), p + "mlp.down_proj.weight": (h, f)}
shapes |= {"model.norm.weight": (h,), "lm_head.weight": (v, h)}
gen = torch.Generator().manual_seed(0)
def make(shape):
    return lambda: (torch.randn(shape, generator=gen) * (1.0 if len(shape) == 1 else 0.02)).to(torch.bfloat16)
write_shards([PlannedTensor(n, s, torch.bfloat16, make(s)) for n, s in shapes.items()], folder, "2GB")
(folder / "config.json").write_text(json.dumps(config, indent=2))
"""

JOBS = ("moeify upcycle + sync", "cp -r + sync")


def make_model(folder: Path, layers: int) -> None:
    folder.mkdir(parents=True)
    config = CONFIG | {"num_hidden_layers": layers}
    subprocess.run([sys.executable, "-c", MAKE, str(folder), json.dumps(config)], check=True)


def timed(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds until the child's bytes are on disk, and its peak RSS (MB)."""
    os.sync()  # start each job with no dirty pages left over from the previous one
    started = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    os.sync()
    seconds = time.perf_counter() - started
    if status != 0:
        sys.exit(f"{cmd[0]} failed: {child.stderr.read().decode()[-2000:]}")
    return seconds, usage.ru_maxrss / 1024


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def measure(source: Path, work: Path, args: argparse.Namespace) -> tuple[dict[str, list], int]:
    """Alternate moeify and cp runs; each deletes the previous run's output before its clock starts."""
    out, copy = work / "out", work / "copy"
    moeify = [sys.executable, "-m", "moeify.cli", "upcycle", str(source), "--experts", str(args.experts),
              "--topk", "2", "--output", str(out)]
    rows: dict[str, list[tuple[float, float]]] = {job: [] for job in JOBS}
    size = 0
    for _ in range(args.runs):
        shutil.rmtree(copy, ignore_errors=True)  # never more than one output and one copy on disk
        shutil.rmtree(out, ignore_errors=True)
        rows["moeify upcycle + sync"].append(timed(moeify))
        size = folder_bytes(out)
        shutil.rmtree(copy, ignore_errors=True)
        rows["cp -r + sync"].append(timed(["cp", "-r", str(out), str(copy)]))
    return rows, size


def report(rows: dict[str, list], size: int, source_bytes: int, args: argparse.Namespace) -> None:
    print(f"synthetic Llama, {args.layers} layers, bf16: {source_bytes / 1e9:.2f} GB -> {args.experts} experts, "
          f"{size / 1e9:.2f} GB written; median of {args.runs} runs, until the bytes are on disk")
    print(f"{'job':<22} {'wall s':>8} {'peak RSS MB':>12} {'MB/s':>8}")
    medians = {}
    for job, samples in rows.items():
        medians[job] = statistics.median(s for s, _ in samples)
        rss = statistics.median(r for _, r in samples)
        print(f"{job:<22} {medians[job]:>8.2f} {rss:>12.0f} {size / 1e6 / medians[job]:>8.0f}")
    print(f"time ratio moeify / cp: {medians[JOBS[0]] / medians[JOBS[1]]:.2f}x "
          f"(runs: {', '.join(f'{m:.1f}/{c:.1f}' for (m, _), (c, _) in zip(*rows.values()))})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--layers", type=int, default=22, help="fewer for a quick look")
    parser.add_argument("--workdir", type=Path, default=None, help="where the work folder goes (created)")
    args = parser.parse_args()
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="moeify-throughput-", dir=args.workdir))
    try:
        make_model(work / "source", args.layers)
        rows, size = measure(work / "source", work, args)
        report(rows, size, folder_bytes(work / "source"), args)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
