"""Split and verify at scale: peak RSS and wall time of a synthetic 1.1B Llama and of SmolLM2-135M.

The 1.1B-class model (TinyLlama's shapes: hidden 2048, FFN 5632, 22 layers, 32 heads, 4 KV heads;
SmolLM2's tokenizer, so vocab 49152) is made here with random bf16 weights, one tensor at a time,
in a work folder this script creates. Each job runs as its own child process (peak RSS from
wait4, so it is the job's own). Then the figures are extrapolated to Mistral-7B by what the
layer-by-layer design holds at once.

    python benchmarks/scale.py [--parts split,verify,smollm2] [--workdir DIR] [--keep] [--model DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The parent stays light (no torch import): a forked child's peak RSS starts from its parent's.
FETCH = "from moeify.source import fallback_smollm2; print(fallback_smollm2(notify=lambda line: None))"
TINYLLAMA = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
             "num_key_value_heads": 4, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
             "tie_word_embeddings": False}
MISTRAL_7B = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
              "num_key_value_heads": 8, "vocab_size": 32000, "tie_word_embeddings": False}
PARTS = ("split", "verify", "smollm2")
SPLIT = ("--granularity", "8", "--topk", "4")
MAKE = r"""
import json, sys, torch
from pathlib import Path
from safetensors.torch import save_file
from transformers import AutoConfig

folder, shapes = Path(sys.argv[1]), json.loads(sys.argv[2])
config = AutoConfig.for_model("llama", **shapes, torch_dtype="bfloat16")
config.save_pretrained(folder)
H, I, V, L = config.hidden_size, config.intermediate_size, config.vocab_size, config.num_hidden_layers
kv = config.num_key_value_heads * H // config.num_attention_heads
gen = torch.Generator().manual_seed(0)
def rand(*shape):
    return (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16)
def layer(i):
    p = f"model.layers.{i}."
    return {p + "self_attn.q_proj.weight": rand(H, H), p + "self_attn.k_proj.weight": rand(kv, H),
            p + "self_attn.v_proj.weight": rand(kv, H), p + "self_attn.o_proj.weight": rand(H, H),
            p + "mlp.gate_proj.weight": rand(I, H), p + "mlp.up_proj.weight": rand(I, H),
            p + "mlp.down_proj.weight": rand(H, I),
            p + "input_layernorm.weight": torch.ones(H, dtype=torch.bfloat16),
            p + "post_attention_layernorm.weight": torch.ones(H, dtype=torch.bfloat16)}
shards = [{"model.embed_tokens.weight": rand(V, H)}] + [layer(i) for i in range(L)]
shards.append({"model.norm.weight": torch.ones(H, dtype=torch.bfloat16), "lm_head.weight": rand(V, H)})
index = {}
for n, shard in enumerate(shards):
    name = f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
    save_file(shard, folder / name, metadata={"format": "pt"})
    index |= {k: name for k in shard}
(folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
"""


def timed(cmd: list[str], log: Path) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of one child process; its output goes to log."""
    started = time.perf_counter()
    with open(log, "wb") as out:
        child = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - started
    if status != 0:
        sys.exit(f"{' '.join(cmd[:5])} failed; see {log}")
    return seconds, usage.ru_maxrss / 1024


def moeify(*args: object) -> list[str]:
    return [sys.executable, "-m", "moeify.cli", *map(str, args)]


def synthetic(work: Path, smollm2: Path) -> Path:
    """The 1.1B-class Llama (bf16, random), with SmolLM2's tokenizer; made once per work folder."""
    folder = work / "llama-1.1b"
    if not (folder / "model.safetensors.index.json").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        vocab = json.loads((smollm2 / "config.json").read_text())["vocab_size"]
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", MAKE, str(folder), json.dumps(TINYLLAMA | {"vocab_size": vocab})],
                       check=True)
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (smollm2 / name).is_file():
                shutil.copy(smollm2 / name, folder / name)
        print(f"made {folder.name}: {weights_gb(folder):.2f} GB bf16 in {time.perf_counter() - started:.0f} s")
    return folder


def weights_gb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 1e9


def params(shapes: dict) -> dict[str, float]:
    """Float32 bytes of what layer-by-layer split and verify hold at once, in GB, for a Llama's shapes."""
    H, I, V, L = (shapes[k] for k in ("hidden_size", "intermediate_size", "vocab_size", "num_hidden_layers"))
    kv = shapes["num_key_value_heads"] * H // shapes["num_attention_heads"]
    layer = 2 * H * H + 2 * kv * H + 3 * H * I
    sums = 8 * (H * H + H * I + 2 * I)  # calibration.LayerStats' float64 sums
    coactivation = 4 * I * I  # its float32 C^T C, and later the (I, I) features that replace it
    tokens = 6144  # --calibration-tokens' default; its hidden states: a few (T, H) float32 copies
    return {"layer": 4 * layer / 1e9, "ffn bf16": 2 * 3 * H * I / 1e9, "stats": (sums + coactivation) / 1e9,
            "sums": sums / 1e9, "coactivation": coactivation / 1e9,
            "embedding": 4 * V * H / 1e9, "hidden": 4 * 4 * tokens * H / 1e9, "total params": (L * layer + 2 * V * H)}


def held(shapes: dict, job: str) -> float:
    """GB the job holds for the model at its peak: split's layer phase, or verify's two heads."""
    p = params(shapes)
    if job == "split":  # the largest of its phases, each beside the tokens' hidden states
        running = p["layer"] + p["stats"]  # one layer (its FFN read through the layer's own weights), the statistics
        planning = p["sums"] + p["coactivation"] + p["ffn bf16"]  # C^T C gone, the features k-means clusters in place
        return max(running, planning, p["embedding"]) + p["hidden"]
    # verify: one model's embeddings and head at a time at the end (untied), or one layer of one model
    return max(2 * p["embedding"], p["layer"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    parser.add_argument("--workdir", type=Path, default=None, help="where the work folder is made (created)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (the 2.4 GB model) afterwards")
    parser.add_argument("--model", type=Path, default=None, help="a synthetic 1.1B made by an earlier --keep run")
    args = parser.parse_args()
    parts = args.parts.split(",")
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    smollm2 = Path(subprocess.run([sys.executable, "-c", FETCH], check=True, capture_output=True,
                                  text=True).stdout.strip())
    work = Path(tempfile.mkdtemp(prefix="moeify-scale-", dir=args.workdir))
    rows = []
    try:
        if "split" in parts or "verify" in parts:
            big = args.model or synthetic(work, smollm2)
            out = work / "llama-1.1b-split8-top4"
            seconds, rss = timed(moeify("split", big, *SPLIT, "--output", out), work / "split.log")
            rows.append(("split 1.1B G=8 top-4", seconds, rss, held(TINYLLAMA | {"vocab_size": 49152}, "split")))
            if "verify" in parts:
                seconds, rss = timed(moeify("verify", big, out), work / "verify.log")
                rows.append(("verify 1.1B vs split", seconds, rss, held(TINYLLAMA | {"vocab_size": 49152}, "verify")))
        if "smollm2" in parts:
            seconds, rss = timed(moeify("split", smollm2, *SPLIT, "--output", work / "smollm2-split"),
                                 work / "smollm2.log")
            rows.append(("split SmolLM2-135M G=8 top-4", seconds, rss, None))
    finally:
        if args.keep:
            print(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    report(rows)


def report(rows: list[tuple[str, float, float, float | None]]) -> None:
    print(f"{'job':<30} {'wall s':>8} {'peak RSS MB':>12}")
    for job, seconds, rss, _ in rows:
        print(f"{job:<30} {seconds:>8.1f} {rss:>12.0f}")
    for job, _, rss, model_gb in rows:
        if model_gb is None:
            continue
        kind = job.split()[0]
        base = rss / 1e3 - model_gb  # the interpreter, torch, transformers, allocator slack
        mistral = base + held(MISTRAL_7B, kind)
        print(f"{kind}: {model_gb:.2f} GB of the peak is the model's (estimated), {base:.2f} GB the rest; "
              f"Mistral-7B ({params(MISTRAL_7B)['total params'] / 1e9:.1f}B): ~{mistral:.1f} GB peak RSS")


if __name__ == "__main__":
    main()
