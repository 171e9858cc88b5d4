"""moeify merge next to mergekit-moe 0.1.5 on one job: 4 experts from SmolLM2-135M and three fine-tunes of it.

    python benchmarks/merge.py [--steps 300] [--seq 64] [--batch 4] [--runs 3] [--parts smollm2,1.1b]

1. Domain texts (benchmarks/data/merge/, written once): Python code (modules of the standard library),
   arithmetic (seeded), English prose (the start of Austen's Emma to train on, its last pages to
   score), and short questions for the base model's own expert. Each has a
   training part and a held-out part.
2. Fine-tunes (cached in ~/.cache/moeify/bench/merge/): SmolLM2-135M-Instruct (float32, the offline
   copy) trained --steps AdamW steps (--batch x --seq tokens, lr 1e-4) on each of code, arithmetic and prose, FFN
   weights only: ~15 minutes per domain on one thread of a shared 2-core machine.
3. The merge, both tools from ONE mergekit-moe YAML (base + 3 fine-tunes, gate_mode hidden, top-2,
   float32, Mixtral): `mergekit-moe config.yml OUT` (mergekit 0.1.5 in a throwaway venv that reuses
   this venv's torch/transformers through a .pth) and `moeify apply config.yml --output OUT`, each in
   a fresh process (posix_spawn), alternating, median wall time and peak RSS (the process's VmHWM).
   After each pair, the start-up both pay (importing torch, transformers' tokenizer and Llama code,
   timed alone): the most any tool that imports them could gain on mergekit-moe.
4. Quality of both outputs: per domain, the share of held-out tokens (after the first of each line)
   whose top-1 expert is that domain's (averaged over layers), and held-out perplexity next to each
   source model's.
5. `--parts 1.1b`: the same merge at 1.1B (benchmarks/scale.py's synthetic TinyLlama-shaped model,
   random bfloat16 weights, and three copies with perturbed FFNs), timed only. Needs ~23 GB of disk
   while it runs (sources 8.8 GB, kept in the cache; each tool's 6.8 GB output, removed after).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "benchmarks" / "data" / "merge"
CACHE = Path(os.environ.get("MOEIFY_CACHE", Path.home() / ".cache" / "moeify")) / "bench" / "merge"
STDLIB = Path(os.__file__).parent
CODE_TRAIN = ("textwrap.py", "fnmatch.py", "bisect.py", "shlex.py", "glob.py", "heapq.py", "colorsys.py", "copy.py")
CODE_HELDOUT = ("getopt.py", "keyword.py", "stat.py")
QUESTIONS = [
    "What is the capital of France?", "How do I make a cup of tea?", "Can you recommend a good book?",
    "Why is the sky blue?", "What should I cook for dinner tonight?", "How far away is the moon?",
    "Who wrote Pride and Prejudice?", "What is a good name for a cat?", "How do plants grow?",
    "Tell me a joke about penguins.", "What time zone is Tokyo in?", "How many legs does a spider have?",
]
DOMAINS = ("chat", "code", "math", "prose")  # expert order: the base model, then the three fine-tunes
# 1e-4: at 3e-4 the code and prose fine-tunes overfit (held-out perplexity of their own domain rose).
LR = 1e-4
# Prose to fine-tune on: ~75k tokens, about what 300 steps of 4 x 64 tokens read, so the prose expert
# learns a style instead of memorising a page (code and arithmetic texts are of that size too).
PROSE_CHARS = 300_000
PROSE_HELDOUT_CHARS = 5_000  # the novel's last pages: the same author's prose, never trained on


# ---------------------------------------------------------------------------- data


def arithmetic(seed: int, lines: int) -> str:
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        a, b = rng.randint(2, 999), rng.randint(2, 999)
        op = rng.choice("+-*")
        out.append(f"{a} {op} {b} = {eval(f'{a}{op}{b}')}")  # our own digits
    return "\n".join(out) + "\n"


def emma(chars: int, end: bool = False) -> str:
    """The start (or with end, the end) of Jane Austen's Emma (benchmarks/data, public domain), one
    paragraph per line."""
    raw = (ROOT / "benchmarks/data/austen-emma.txt").read_text()
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", raw)]
    text = "\n".join(p for p in paragraphs if len(p) > 80)
    return (text[-chars:].partition("\n")[2] if end else text[:chars]) + "\n"


def make_data() -> dict[str, tuple[str, str]]:
    """(training text, held-out text) per domain, written once under benchmarks/data/merge."""
    DATA.mkdir(parents=True, exist_ok=True)
    sources = {
        "code": (lambda: "\n\n".join((STDLIB / m).read_text() for m in CODE_TRAIN),
                 lambda: "\n\n".join((STDLIB / m).read_text() for m in CODE_HELDOUT)),
        "math": (lambda: arithmetic(1, 4000), lambda: arithmetic(2, 300)),
        "prose": (lambda: emma(PROSE_CHARS), lambda: emma(PROSE_HELDOUT_CHARS, end=True)),
        "chat": (lambda: "\n".join(QUESTIONS[:8]) + "\n", lambda: "\n".join(QUESTIONS[8:]) + "\n"),
    }
    out = {}
    for domain, (train, heldout) in sources.items():
        for part, make in (("train", train), ("heldout", heldout)):
            path = DATA / f"{domain}.{part}.txt"
            if not path.is_file():
                path.write_text(make())
        out[domain] = ((DATA / f"{domain}.train.txt").read_text(), (DATA / f"{domain}.heldout.txt").read_text())
    return out


def prompts(text: str, count: int = 6) -> list[str]:
    lines = [line.strip() for line in text.splitlines() if len(line.strip()) > 12]
    step = max(len(lines) // count, 1)
    return [line[:200] for line in lines[::step][:count]]


# ---------------------------------------------------------------------------- fine-tunes


def base_folder() -> Path:
    from moeify.source import fallback_smollm2

    return fallback_smollm2(notify=print)


def fine_tune(base: Path, domain: str, text: str, steps: int, seq: int, batch: int) -> Path:
    """SmolLM2 trained `steps` steps of batch x seq tokens on one domain's text, FFN weights only; cached."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = CACHE / f"{domain}-{steps}x{batch}x{seq}-lr{LR:g}"
    if (folder / "config.json").is_file():
        return folder
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    ids = torch.tensor(tokenizer(text)["input_ids"])
    rows = ids[: len(ids) // seq * seq].reshape(-1, seq)
    params = [p for n, p in model.named_parameters() if ".mlp." in n]
    for n, p in model.named_parameters():
        p.requires_grad_(".mlp." in n)
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    model.train()
    started = time.perf_counter()
    for step in range(steps):
        chosen = rows[torch.randint(len(rows), (batch,))]
        loss = model(chosen, labels=chosen).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 10 == 0 or step == steps - 1:
            print(f"  {domain} step {step + 1}/{steps} loss {loss.item():.3f} ({time.perf_counter() - started:.0f} s)")
    staging = folder.with_name(folder.name + ".part")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    staging.rename(folder)
    return folder


# ---------------------------------------------------------------------------- the two tools


def mergekit_venv() -> Path:
    """A throwaway venv with mergekit 0.1.5, reusing this venv's packages (torch, transformers) via a .pth."""
    venv = CACHE / "mergekit-venv"
    tool = venv / "bin" / "mergekit-moe"
    if tool.is_file():
        return tool
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    site = next((venv / "lib").glob("python*/site-packages"))
    ours = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]
    (site / "moeify-bench.pth").write_text("\n".join(ours) + "\n")
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "mergekit==0.1.5"], check=True)
    return tool


def config_yaml(base: Path, experts: list[Path], data: dict[str, tuple[str, str]], dtype: str) -> str:
    """One mergekit-moe YAML for both tools: experts[e] gets the prompts of DOMAINS[e]."""
    lines = [f"base_model: {base}", "gate_mode: hidden", f"dtype: {dtype}", "experts_per_token: 2", "experts:"]
    for domain, folder in zip(DOMAINS, experts, strict=True):
        lines += [f"  - source_model: {folder}", "    positive_prompts:"]
        lines += [f"      - {json.dumps(p)}" for p in prompts(data[domain][0])]
    return "\n".join(lines) + "\n"


def timed(command: list[str], log: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS MB) of one fresh process.

    The peak is the process's own VmHWM, read from /proc every 20 ms while it runs (it only
    grows; the last read before exit is the peak, short of a rise in the final 20 ms). Not
    wait4's ru_maxrss: a child started by fork or posix_spawn (vfork) is charged its parent's
    high-water mark when it execs, and this process is large after scoring models.
    """
    with open(log, "wb") as out:
        actions = [(os.POSIX_SPAWN_DUP2, out.fileno(), 1), (os.POSIX_SPAWN_DUP2, out.fileno(), 2)]
        started = time.perf_counter()
        pid = os.posix_spawn(command[0], command, os.environ, file_actions=actions)
        peak = 0
        while True:
            peak = max(peak, _high_water_kb(pid))
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.02)
        seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{log.read_text()[-3000:]}")
    return seconds, peak / 1024


def _high_water_kb(pid: int) -> int:
    """VmHWM of a running process in kB; 0 once it has exited (a zombie has no memory map)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return 0
    return next((int(line.split()[1]) for line in lines if line.startswith("VmHWM:")), 0)


# ---------------------------------------------------------------------------- quality


def quality(folder: Path, data: dict[str, tuple[str, str]], tokens: int = 2048) -> dict[str, tuple[float, float | None]]:
    """Per domain: (held-out perplexity, share of tokens whose top-1 expert is the domain's, or None for a dense model)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    moe = getattr(model.config, "num_local_experts", None) is not None
    out = {}
    for e, domain in enumerate(DOMAINS):
        ids = torch.tensor(tokenizer(data[domain][1])["input_ids"][:tokens])
        nll, count, hits, routed = 0.0, 0, 0.0, 0
        for chunk in ids.split(256):
            if len(chunk) < 2:
                continue
            with torch.no_grad():
                result = model(chunk[None], labels=chunk[None], output_router_logits=moe)
            nll += result.loss.item() * (len(chunk) - 1)
            count += len(chunk) - 1
            if moe:
                tops = torch.stack([r.reshape(len(chunk), -1)[1:].argmax(-1) for r in result.router_logits])
                hits += float((tops == e).float().mean(0).sum())
                routed += len(chunk) - 1
        out[domain] = (math.exp(nll / count), hits / routed if moe else None)
    return out


# ---------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="fine-tuning steps per domain")
    parser.add_argument("--seq", type=int, default=64, help="tokens per fine-tuning sequence")
    parser.add_argument("--batch", type=int, default=4, help="sequences per fine-tuning step")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--parts", default="smollm2", help="comma-separated: smollm2, 1.1b")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    data = make_data()
    base = base_folder()
    parts = args.parts.split(",")
    if "smollm2" in parts:
        smollm2_job(base, data, args)
    if "1.1b" in parts:
        scaled_job(base, data, args)


def smollm2_job(base: Path, data: dict[str, tuple[str, str]], args: argparse.Namespace) -> None:
    """The issue's job: SmolLM2 and three fine-tunes of it, float32; time, memory, then routing and quality."""
    tunes = {d: fine_tune(base, d, data[d][0], args.steps, args.seq, args.batch) for d in DOMAINS[1:]}
    work = fresh(CACHE / "run")
    yaml = work / "config.yml"
    yaml.write_text(config_yaml(base, [base, *tunes.values()], data, "float32"))
    print(f"4 experts (SmolLM2-135M-Instruct + 3 fine-tunes of {args.steps} x {args.batch} x {args.seq} tokens), "
          f"hidden gates, top-2, float32, Mixtral; median of {args.runs}, {args.threads} threads")
    outputs = compare(yaml, work, args.runs)
    rows = {"base (SmolLM2-135M-Instruct)": quality(base, data)}
    rows |= {f"fine-tune: {d}": quality(tunes[d], data) for d in DOMAINS[1:]}
    rows |= {name: quality(out, data) for name, out in outputs.items()}
    print("held-out perplexity per domain (share of tokens reaching the domain's expert first, mean over layers)")
    print(f"{'model':<32}" + "".join(f"{d:>18}" for d in DOMAINS))
    for name, per in rows.items():
        cells = "".join(f"{ppl:>9.2f}" + (f" ({share:>5.0%})" if share is not None else " " * 8)
                        for ppl, share in per.values())
        print(f"{name:<32}{cells}")


def scaled_job(smollm2: Path, data: dict[str, tuple[str, str]], args: argparse.Namespace) -> None:
    """The same merge at 1.1B (TinyLlama's shapes, random bfloat16 weights, SmolLM2's tokenizer; the three
    other experts are the base with every FFN weight perturbed), timed only: start-up (importing torch and
    transformers, ~6 s for either tool) is then a small part of the run, as it is for real merges."""
    sys.path.insert(0, str(Path(__file__).parent))
    from scale import synthetic  # the 1.1B model benchmarks/scale.py makes

    work = CACHE / "1.1b"
    base = synthetic(work, smollm2)
    tunes = [perturbed(base, work / f"tune-{seed}", seed) for seed in (1, 2, 3)]
    run = fresh(work / "run")
    yaml = run / "config.yml"
    yaml.write_text(config_yaml(base, [base, *tunes], data, "bfloat16"))
    print(f"4 experts of a 1.1B Llama (random bfloat16 weights), hidden gates, top-2, bfloat16, Mixtral; "
          f"median of {args.runs}, {args.threads} threads")
    compare(yaml, run, args.runs)
    for out in run.iterdir():
        if out.is_dir():
            shutil.rmtree(out)  # 6.8 GB each


def perturbed(base: Path, folder: Path, seed: int) -> Path:
    """base with every FFN weight times (1 + 0.01 noise), one shard at a time; made once."""
    from safetensors.torch import load_file, save_file

    if (folder / "config.json").is_file():
        return folder
    staging = fresh(folder.with_name(folder.name + ".part"))
    gen = torch.Generator().manual_seed(seed)
    for path in sorted(base.iterdir()):
        if path.suffix != ".safetensors":
            shutil.copy(path, staging / path.name)
            continue
        tensors = load_file(path)
        for name, t in tensors.items():
            if ".mlp." in name:
                tensors[name] = (t.float() * (1 + 0.01 * torch.randn(t.shape, generator=gen))).to(t.dtype)
        save_file(tensors, staging / path.name, metadata={"format": "pt"})
    staging.rename(folder)
    return folder


def fresh(folder: Path) -> Path:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


# What either tool imports before it merges anything (mergekit-moe's venv reuses this venv's torch and
# transformers): a floor under both wall times, timed alone in a fresh process after each pair of runs.
START_UP = "import torch; from transformers import AutoTokenizer; import transformers.models.llama.modeling_llama"


def compare(yaml: Path, work: Path, runs: int) -> dict[str, Path]:
    """Both tools on one mergekit-moe YAML, alternating, each run in a fresh process; prints the medians.
    Returns each tool's output folder (from its last run)."""
    tool = mergekit_venv()
    jobs = {"moeify apply (merge)": [sys.executable, "-m", "moeify", "apply", str(yaml), "--output"],
            "mergekit-moe 0.1.5": [str(tool), str(yaml)]}
    outputs = {name: work / name.split()[0] for name in jobs}
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in jobs}
    start_up = []
    for run in range(runs):
        for name, command in jobs.items():
            shutil.rmtree(outputs[name], ignore_errors=True)  # outside the clock
            extra = ["--device", "cpu"] if name.startswith("mergekit") else []
            results[name].append(timed([*command, str(outputs[name]), *extra], work / f"{name.split()[0]}.log"))
            print(f"run {run + 1}: {name}: {results[name][-1][0]:.1f} s, {results[name][-1][1]:.0f} MB")
        start_up.append(timed([sys.executable, "-c", START_UP], work / "start-up.log")[0])
    print(f"\n{'job':<24}{'wall s':>9}{'peak RSS MB':>13}")
    medians = {}
    for name, got in results.items():
        medians[name] = (statistics.median(r[0] for r in got), statistics.median(r[1] for r in got))
        print(f"{name:<24}{medians[name][0]:>9.1f}{medians[name][1]:>13.0f}")
    ours, theirs = medians.values()
    print(f"moeify / mergekit: time {theirs[0] / ours[0]:.2f}x faster, peak memory {ours[1] / theirs[1]:.2f} of it")
    floor = statistics.median(start_up)
    print(f"start-up both pay (python importing torch, transformers' tokenizer and Llama modeling): {floor:.1f} s; "
          f"after it, moeify {ours[0] - floor:.1f} s and mergekit {theirs[0] - floor:.1f} s "
          f"({(theirs[0] - floor) / max(ours[0] - floor, 1e-9):.2f}x); no tool paying that start-up can be more "
          f"than {theirs[0] / floor:.2f}x faster than mergekit here\n")
    return outputs


if __name__ == "__main__":
    main()
