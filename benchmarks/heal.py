"""Healing converted SmolLM2-135M models with `moeify train`, and what the loop costs.

    python benchmarks/heal.py                                   # split G=8 top-4, routers and moe, 100k tokens
    python benchmarks/heal.py --tokens 400000 --jobs routers    # further, one job
    python benchmarks/heal.py --layouts g8,g64s8,upcycle --tokens 51200
    python benchmarks/heal.py --jobs routers,moe,local        # global distillation vs layer-wise (local)
    python benchmarks/heal.py --layouts g64s8 --calibration builtin   # splits calibrated on moeify's corpus
    python benchmarks/heal.py --overhead-only                   # the loop against a bare accelerate loop
    python benchmarks/heal.py --layouts g8,g8r --calibration builtin --jobs routers --tokens 20480 \
        --eval-every 5 --no-overhead                            # a split without and with --refit
    python benchmarks/heal.py --layouts g8 --calibration builtin --jobs all --aux 0 --lr 2e-4 --schedule cosine \
        --train-text web --no-overhead                          # the best G=8 recipe so far

Model: SmolLM2-135M-Instruct (moeify's offline copy), the teacher of every run. Training text:
Jane Austen's "Emma" (Project Gutenberg #158, public domain; benchmarks/data/austen-emma.txt),
paragraphs reflowed; with --train-text corpus moeify's built-in calibration corpus; with
--train-text web ~650k tokens of modern English (300 ABC news articles and the Wikipedia articles
of a shortened 2016 dump, test data in gensim's wheel, fetched once from PyPI); with --train-text
teacher text the dense model samples itself (made once per token count). Held-out
text: benchmarks/data/heldout.txt (modern prose, disjoint from all of them). Each conversion is made
once with the moeify CLI, then each job is one `python -m moeify train` run with a constant
learning rate after warmup (10% of the steps; --schedule cosine decays it instead), scored on the
held-out text every --eval-every steps: the table reads the curve at each token budget, so one
run gives every budget. Ratios are to the dense model's perplexity on the same tokens.

The overhead part times moeify's loop (from its train_log.jsonl: wall time per step, logging
included, evaluations excluded) against a bare loop in the same process doing the same work:
teacher forward, student forward, KL, backward, AdamW step; the median step of each.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "benchmarks" / "data"
SEQ_LEN, BATCH = 256, 4  # 1024 tokens per step; --seq-len and --batch-size change them

# How each layout is made from the dense model (moeify CLI arguments after the source).
LAYOUTS = {
    "g8": ["split", "--granularity", "8", "--topk", "4"],  # activation partition, fitted routers
    "g64s8": ["split", "--granularity", "64", "--shared-experts", "8", "--topk", "24"],
    # The best 50 %-active layout of benchmarks/split_quality.py (x2.26 before any training).
    "g256s32": ["split", "--granularity", "256", "--shared-experts", "32", "--topk", "96"],
    # The same two with least-squares down projections (`split --refit`), fitted on the calibration text.
    "g8r": ["split", "--granularity", "8", "--topk", "4", "--refit"],
    "g256s32r": ["split", "--granularity", "256", "--shared-experts", "32", "--topk", "96", "--refit"],
    "upcycle": ["upcycle", "--experts", "8", "--topk", "2", "--drop-ratio", "0.5", "--format", "remote"],
}
# What trains in each job, all distilled from the dense model.
JOBS = {
    "routers": ["--train", "routers", "--lr", "1e-4"],
    "moe": ["--train", "moe", "--lr", "1e-4"],
    "all": ["--train", "all", "--lr", "1e-4"],  # attention, norms and embeddings too
    # The same parameters, each MoE layer fitted to its dense FFN's output on the teacher's hidden states.
    "local": ["--train", "moe", "--objective", "local", "--lr", "1e-4"],
}


def moeify(*args: object, log: Path) -> float:
    """Run the moeify CLI in a child process (its output into log); wall seconds."""
    started = time.perf_counter()
    with open(log, "w") as out:
        done = subprocess.run([sys.executable, "-m", "moeify", *map(str, args)], check=False, stdout=out,
                              stderr=out, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        sys.exit(f"moeify {' '.join(map(str, args[:2]))} failed; see {log}")
    return time.perf_counter() - started


def training_text(work: Path, corpus: bool = False) -> Path:
    """Emma with each paragraph on one line (the Gutenberg file wraps lines at 70 characters), or with
    corpus moeify's built-in calibration corpus (modern prose, dialogue, code; ~25k tokens)."""
    if corpus:
        path = work / "corpus.txt"
        path.write_text("\n\n".join(f.read_text() for f in sorted((REPO / "moeify/data/calibration").glob("*.txt"))))
        return path
    path = work / "train.txt"
    if not path.is_file():
        raw = (DATA / "austen-emma.txt").read_text()
        paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", raw)]
        path.write_text("\n\n".join(p for p in paragraphs if p) + "\n")
    return path


GENSIM = "gensim==4.4.0"  # its wheel's test data: news articles and a slice of an English Wikipedia dump
WEB_FILES = ("lee_background.cor", "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")


def web_text(work: Path) -> Path:
    """Modern English of two kinds, interleaved by document: the Lee corpus (300 ABC news articles)
    and the Wikipedia articles of a shortened 2016 dump, both shipped as test data in gensim's wheel
    (fetched from PyPI without its dependencies, never installed), markup stripped."""
    path = work / "web.txt"
    if path.is_file():
        return path
    import bz2
    import tempfile
    import zipfile

    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", GENSIM, "-d", tmp], check=True)
        with zipfile.ZipFile(next(Path(tmp).glob("gensim-*.whl"))) as wheel:
            news, wiki = (wheel.read(f"gensim/test/test_data/{name}") for name in WEB_FILES)
    articles = [" ".join(line.split()) for line in news.decode().splitlines() if line.strip()]
    pages = [page for page in map(_wiki_plain, _wiki_pages(bz2.decompress(wiki).decode())) if page]
    documents = [d for pair in itertools.zip_longest(articles, pages) for d in pair if d]
    path.write_text("\n\n".join(documents) + "\n")
    return path


def teacher_text(work: Path, dense: Path, tokens: int) -> Path:
    """Text the teacher writes itself (data-free distillation, as in LLM-QAT): continuations of
    256 tokens, sampled at temperature 1 (top-p 0.95), each from the first 3-8 words of a paragraph
    of moeify's built-in calibration corpus; batches of 64 until `tokens` are written (made once)."""
    import random

    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = work / f"teacher-{tokens}.txt"
    if path.is_file():
        return path
    torch.manual_seed(0)
    random.seed(0)
    tokenizer = AutoTokenizer.from_pretrained(dense)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32).eval()
    paragraphs = []
    for file in sorted((REPO / "moeify/data/calibration").glob("*.txt")):
        paragraphs += [p for p in re.split(r"\n\s*\n", file.read_text()) if len(p.split()) > 8]
    random.shuffle(paragraphs)
    seeds = [" ".join(p.split()[:random.randint(3, 8)]) for p in paragraphs]
    texts, written = [], 0
    while written < tokens:
        batch = [seeds[(len(texts) + j) % len(seeds)] for j in range(64)]
        encoded = tokenizer(batch, return_tensors="pt", padding=True)
        with torch.no_grad():
            rows = model.generate(**encoded, max_new_tokens=256, do_sample=True, temperature=1.0, top_p=0.95,
                                  top_k=0, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        for row in rows:
            text = tokenizer.decode(row, skip_special_tokens=True).strip()
            texts.append(" ".join(text.split()))
            written += len(tokenizer(text).input_ids)
        print(f"teacher text: {written} tokens", flush=True)
    path.write_text("\n\n".join(texts) + "\n")
    return path


def _wiki_pages(xml: str) -> list[str]:
    """The wikitext of every article (redirects left out)."""
    import xml.etree.ElementTree as ET

    root = ET.fromstring(xml)
    texts = [t.text or "" for t in root.iter() if t.tag.endswith("}text")]
    return [t for t in texts if not t.lstrip().upper().startswith("#REDIRECT")]


def _wiki_plain(wikitext: str) -> str:
    """Paragraphs of prose from wikitext: references, templates, tables, files and markup dropped,
    links reduced to their text; lists, headings and short lines left out."""
    text = re.sub(r"<ref[^>]*/>|<ref.*?</ref>|<!--.*?-->", "", wikitext, flags=re.DOTALL)
    while True:  # templates nest: strip the innermost until none is left
        text, count = re.subn(r"\{\{[^{}]*\}\}|\{\|[^{}]*?\|\}", "", text)
        if not count:
            break
    text = re.sub(r"\[\[(?:File|Image|Category):[^\[\]]*(?:\[\[[^\]]*\]\][^\[\]]*)*\]\]", "", text)
    text = re.sub(r"\[\[(?:[^\]|]*\|)?([^\]]*)\]\]", r"\1", text)
    text = re.sub(r"\[https?://\S+ ?([^\]]*)\]", r"\1", text)
    text = re.sub(r"<[^>]+>|'{2,}", "", text)
    lines = [" ".join(line.split()) for line in text.splitlines()]
    return "\n\n".join(line for line in lines if len(line.split()) >= 12 and not line.startswith(("*", "#", "|", "!", "=", ":", "{", "}")))


def convert(layout: str, dense: Path, text: Path, work: Path, builtin: bool = False) -> Path:
    """The layout made once; a split calibrated on the training text, or with builtin on moeify's own corpus."""
    split = LAYOUTS[layout][0] == "split"
    out = work / (layout + ("-builtin" if builtin and split else ""))
    if not (out / "moeify.json").is_file():
        calibration = ["--calibration", text] if split and not builtin else []
        seconds = moeify(*LAYOUTS[layout][:1], dense, *LAYOUTS[layout][1:], *calibration, "--output", out,
                         "--overwrite", log=work / f"{out.name}.log")
        print(f"{out.name}: converted in {seconds:.0f} s")
    return out


def heal(model: Path, dense: Path, job: str, text: Path, tokens: int, eval_every: int, work: Path,
         lr: float | None = None, router_lr: float | None = None, schedule: str = "constant",
         aux: float | None = None) -> list[dict]:
    """One training run; its held-out curve as rows of step, tokens, seconds, perplexity, ratio.

    lr: the learning rate of what trains, instead of the job's own; router_lr: the routers' (lr when
    not given); aux: the weight of the model's own router losses (default: moeify train's, 1).
    """
    out = work / (f"{model.name}-{job}" + (f"-lr{lr:g}" if lr else "") + (f"-r{router_lr:g}" if router_lr else "")
                  + ("" if schedule == "constant" else f"-{schedule}")
                  + ("" if text.name == "train.txt" else f"-{text.stem}") + ("" if aux is None else f"-aux{aux:g}")
                  + ("" if (SEQ_LEN, BATCH) == (256, 4) else f"-s{SEQ_LEN}b{BATCH}"))
    router_lr = router_lr or lr
    rates = (["--lr", lr] if lr else []) + (["--router-lr", router_lr] if router_lr else [])
    rates += ["--aux", aux] if aux is not None else []
    # --trust-remote-code: the conversion in the cache may carry an earlier moeify's remote code
    # (written by moeify itself); it runs as written rather than being refused.
    moeify("train", model, "--data", text, "--eval-text", DATA / "heldout.txt", "--output", out, "--overwrite",
           "--trust-remote-code", "--teacher", dense, "--max-tokens", tokens, "--seq-len", SEQ_LEN,
           "--batch-size", BATCH, "--schedule", schedule,
           "--warmup", max(1, tokens // (SEQ_LEN * BATCH) // 10), "--eval-every", eval_every, "--save-every", 0,
           "--log-every", 1, "--distill", 1, "--lm", 0, *JOBS[job], *rates,
           log=work / f"{out.name}.log")
    record = json.loads((out / "moeify.json").read_text())["training"][-1]
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    seconds = {row["step"]: row["seconds"] for row in log if "seconds" in row} | {0: 0.0}
    teacher = record["teacher_perplexity"]
    return [{"step": row["step"], "tokens": row["step"] * SEQ_LEN * BATCH, "seconds": seconds[row["step"]],
             "perplexity": row["eval_perplexity"], "ratio": row["eval_perplexity"] / teacher}
            for row in log if "eval_perplexity" in row]


def table(results: dict[tuple[str, str], list[dict]], budgets: list[int]) -> None:
    print(f"\n{'layout':<14} {'job':<8} {'tokens':>8} {'train s':>8} {'ppl ratio before -> after':>26}")
    for (layout, job), curve in results.items():
        before, shown = curve[0]["ratio"], set()
        for budget in budgets:
            reached = [row for row in curve if row["tokens"] >= budget]
            if reached and reached[0]["step"] not in shown:  # two budgets may land on one evaluation
                row = reached[0]
                shown.add(row["step"])
                change = f"×{before:.2f} -> ×{row['ratio']:.2f}"
                print(f"{layout:<14} {job:<8} {row['tokens']:>8} {row['seconds']:>8.0f} {change:>26}")
        print(f"{'':<14} curve: " + ", ".join(f"{row['tokens'] // 1000}k ×{row['ratio']:.2f}" for row in curve))


# ---------------------------------------------------------------------------- overhead


def moeify_steps(model: Path, dense: Path, text: Path, steps: int, work: Path) -> list[float]:
    """Per-step wall seconds of moeify's own loop, in this process (from its train_log.jsonl)."""
    from moeify.commands.train import run
    from moeify.training.settings import Settings

    out = work / "overhead-moeify"
    settings = Settings(data=str(text), eval_text=str(DATA / "heldout.txt"), seq_len=SEQ_LEN, batch_size=BATCH,
                        steps=steps, train="routers", lr=1e-3, save_every=0, schedule="constant", warmup=0,
                        teacher=str(dense))
    run(str(model), out, settings, overwrite=True, trust_remote_code=True)
    seconds = [json.loads(line).get("seconds") for line in (out / "train_log.jsonl").read_text().splitlines()]
    seconds = [0.0] + [s for s in seconds if s is not None]
    return [b - a for a, b in itertools.pairwise(seconds)]


def bare_steps(model: Path, dense: Path, text: Path, steps: int) -> list[float]:
    """Per-step wall seconds of the plainest accelerate loop doing the same passes."""
    import torch.nn.functional as F
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    from moeify.loading import Code, load_model, tokenizer_in
    from moeify.training import data
    from moeify.training.selection import select
    from moeify.training.settings import Trainable

    accelerator = Accelerator()
    student, teacher = load_model(model, Code.FOLDER), load_model(dense)
    select(student, Trainable.ROUTERS)
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-3)
    student, optimizer = accelerator.prepare(student, optimizer)
    student.train()
    sequences = data.pack(data.token_ids([text.read_text()], tokenizer_in(dense)), SEQ_LEN)
    times = []
    for step in range(steps):
        ids = sequences[step * BATCH:(step + 1) * BATCH]
        started = time.perf_counter()
        with torch.no_grad():
            target = F.log_softmax(teacher(input_ids=ids).logits.float(), dim=-1)
        logits = F.log_softmax(student(input_ids=ids).logits.float(), dim=-1)
        loss = F.kl_div(logits.flatten(0, 1), target.flatten(0, 1), log_target=True, reduction="batchmean")
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - started)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return times


def overhead(model: Path, dense: Path, text: Path, steps: int, rounds: int, work: Path) -> None:
    """Alternate the two loops; drop each run's first two steps (allocation), compare medians."""
    ours, bare = [], []
    for _ in range(rounds):
        ours += moeify_steps(model, dense, text, steps, work)[2:]
        bare += bare_steps(model, dense, text, steps)[2:]
    a, b = statistics.median(ours), statistics.median(bare)
    print(f"\nloop overhead, split {model.name}, routers, {SEQ_LEN * BATCH} tokens per step, "
          f"{len(ours)} steps each, {torch.get_num_threads()} threads")
    print(f"moeify train  median {a:.3f} s/step (min {min(ours):.3f})")
    print(f"bare loop     median {b:.3f} s/step (min {min(bare):.3f})")
    print(f"ratio moeify / bare: {a / b:.3f} (median), {min(ours) / min(bare):.3f} (best)")


def main() -> None:
    global SEQ_LEN, BATCH
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layouts", default="g8", help=f"comma-separated: {', '.join(LAYOUTS)}")
    parser.add_argument("--jobs", default="routers,moe", help=f"comma-separated: {', '.join(JOBS)}")
    parser.add_argument("--tokens", type=int, default=102400, help="training tokens per run")
    parser.add_argument("--budgets", default="25600,51200,102400,204800,409600",
                        help="token counts the table reads the curves at")
    parser.add_argument("--eval-every", type=int, default=25, help="steps between held-out scores")
    parser.add_argument("--lr", type=float, help="one learning rate for every job instead of each job's "
                                                  "(the routers' too, unless --router-lr)")
    parser.add_argument("--calibration", choices=("train", "builtin"), default="train",
                        help="what splits are calibrated on: the training text, or moeify's built-in corpus")
    parser.add_argument("--train-text", choices=("emma", "corpus", "web", "teacher"), default="emma",
                        help="what the student is distilled on: Emma, moeify's built-in corpus, web (news and "
                             "Wikipedia, ~650k tokens of modern English, the held-out kind), or text the teacher "
                             "samples itself (as many tokens as the run needs)")
    parser.add_argument("--schedule", choices=("constant", "cosine"), default="constant",
                        help="after warmup; constant reads every budget off one curve, cosine ends lower for one")
    parser.add_argument("--aux", type=float, help="weight of the model's own router losses (load balancing, "
                        "z-loss); 0 distils alone (default: moeify train's, 1)")
    parser.add_argument("--router-lr", type=float, help="the routers' learning rate (default: --lr, or the job's)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "moeify" / "heal")
    parser.add_argument("--overhead-steps", type=int, default=12)
    parser.add_argument("--overhead-rounds", type=int, default=2)
    parser.add_argument("--overhead-only", action="store_true")
    parser.add_argument("--no-overhead", action="store_true")
    args = parser.parse_args()
    SEQ_LEN, BATCH = args.seq_len, args.batch_size

    from moeify.source import fallback_smollm2

    args.work.mkdir(parents=True, exist_ok=True)
    dense = fallback_smollm2(notify=print)
    text = (web_text(args.work) if args.train_text == "web"
            # 10 % over the run's tokens: counted per sample here, the joined file tokenises a little differently
            else teacher_text(args.work, dense, int(args.tokens * 1.1)) if args.train_text == "teacher"
            else training_text(args.work, args.train_text == "corpus"))
    budgets = [int(b) for b in args.budgets.split(",") if int(b) <= args.tokens]
    if not args.overhead_only:
        results = {}
        for layout in args.layouts.split(","):
            model = convert(layout, dense, text, args.work, builtin=args.calibration == "builtin")
            for job in args.jobs.split(","):
                started = time.perf_counter()
                results[model.name, job] = heal(model, dense, job, text, args.tokens, args.eval_every, args.work,
                                                args.lr, args.router_lr, args.schedule, args.aux)
                print(f"{model.name} {job}: {time.perf_counter() - started:.0f} s wall")
        table(results, budgets or [args.tokens])
    if not args.no_overhead:
        overhead(convert("g8", dense, text, args.work), dense, text, args.overhead_steps, args.overhead_rounds,
                 args.work)


if __name__ == "__main__":
    main()
