"""How much a training-free split costs: perplexity on held-out English text, real router vs oracle.

    python benchmarks/split_quality.py              # the full table (~10-20 minutes on 2 busy CPU cores)
    python benchmarks/split_quality.py --quick      # three rows
    python benchmarks/split_quality.py --quick --refit   # and each row with --refit's down projections

Model: SmolLM2-135M-Instruct (moeify's offline copy). Calibration text: benchmarks/data/
calibration.txt; held-out text: benchmarks/data/heldout.txt (disjoint prose). Each row splits
every FFN with moeify.split's own grouping and router code, then runs the model in-process
with each FFN replaced by its routed pieces: a token keeps the shared pieces plus the top-k
routed pieces, each with weight 1 (the remote format's "unit" scoring). The oracle router
keeps the k pieces with the largest activation mass for that token (it sees the answer), so
it bounds what any router could do with that grouping. With --refit, each row is also scored
with the down projections `moeify split --refit` fits (moeify.refit) on the calibration text for
the real router. No checkpoint is written: the
exactness of the written checkpoints is tests/test_split.py's job.
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from dataclasses import replace
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from moeify import calibration
from moeify.adapters import adapter_for
from moeify.checkpoint import Checkpoint
from moeify.refit import refitted_down
from moeify.source import fallback_smollm2
from moeify.spec import Mode, Partition, Spec, SplitRouter
from moeify.split import neuron_groups, route

DATA = Path(__file__).parent / "data"

# (partition, G, shared, top-k) rows of the table.
FULL = [
    ("contiguous", 8, 0, 4), ("random", 8, 0, 4), ("cluster", 8, 0, 4), ("activation", 8, 0, 4),
    ("activation", 8, 1, 3), ("activation", 16, 2, 6), ("activation", 32, 4, 12), ("cluster", 64, 8, 24),
    ("activation", 64, 8, 24), ("activation", 64, 16, 16), ("activation", 128, 16, 48), ("activation", 256, 32, 96),
    ("activation", 64, 8, 8), ("activation", 64, 8, 40), ("activation", 8, 0, 8),
]
QUICK = [("contiguous", 8, 0, 4), ("activation", 8, 0, 4), ("activation", 256, 32, 96)]


class SplitFFN(torch.nn.Module):
    """An FFN computed as the sum of its selected pieces (unit weights), for measurement.

    Every piece is a set of the FFN's neurons, so the pieces' outputs are the dense activations
    (T, I) masked to the chosen pieces' neurons, then projected down: same sum, one matmul.
    """

    def __init__(self, ffn, act, piece_of: torch.Tensor, router: torch.Tensor, topk: int, oracle: bool):
        super().__init__()
        self.ffn, self.act, self.topk, self.oracle = ffn, act, topk, oracle
        self.piece_of = piece_of  # (I,) routed piece of each neuron, -1 for shared neurons
        self.router = router  # (E, H)
        self.column_norms = ffn.down.norm(dim=0)  # (I,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = calibration.neuron_activations(self.ffn, self.act, x)  # (B, T, I)
        routed = self.piece_of >= 0
        if self.oracle:  # each piece's activation mass for this token
            mass = (a.abs() * self.column_norms)[..., routed]
            scores = torch.zeros(*a.shape[:-1], len(self.router)).index_add_(-1, self.piece_of[routed], mass)
        else:
            scores = x @ self.router.T
        chosen = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, scores.topk(self.topk, dim=-1).indices, True)
        keep = torch.where(routed, chosen[..., self.piece_of.clamp_min(0)], True)
        return (a * keep) @ self.ffn.down.T


def perplexity(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return math.exp(model(ids, labels=ids).loss.item())


def evaluate(model, ffns, act, stats, spec: Spec, groups: list, oracle: bool, refit: bool = False) -> float:
    """Held-out perplexity with every FFN split into `groups` (per layer: (shared, routed) neuron groups)."""
    mlps = [layer.mlp for layer in model.model.layers]
    for i, ffn in enumerate(ffns):
        shared, routed = groups[i]
        piece_of = torch.full((ffn.intermediate_size,), -1, dtype=torch.long)
        for e, g in enumerate(routed):
            piece_of[g] = e
        router = route(ffn, routed, spec, stats[i])
        if refit:
            ffn = replace(ffn, down=refitted_down(ffn, act, shared, routed, router, spec.topk, stats[i].inputs))
        model.model.layers[i].mlp = SplitFFN(ffn, act, piece_of, router, spec.topk, oracle)
    try:
        return perplexity(model, HELDOUT)
    finally:
        for layer, mlp in zip(model.model.layers, mlps):
            layer.mlp = mlp


def neuron_oracle(model, ffns, act, share: float) -> float:
    """Reference: every neuron its own piece, the top share of neurons per token kept."""
    mlps = [layer.mlp for layer in model.model.layers]
    for i, ffn in enumerate(ffns):
        I = ffn.intermediate_size
        model.model.layers[i].mlp = SplitFFN(ffn, act, torch.arange(I), torch.zeros(I, ffn.hidden_size),
                                             int(share * I), oracle=True)
    try:
        return perplexity(model, HELDOUT)
    finally:
        for layer, mlp in zip(model.model.layers, mlps):
            layer.mlp = mlp


def main() -> None:
    global HELDOUT
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--router", default="fit", choices=[r.value for r in SplitRouter])
    parser.add_argument("--tokens", type=int, default=Spec.calibration_tokens,
                        help="calibration tokens (the text's, topped up with the built-in corpus)")
    parser.add_argument("--refit", action="store_true", help="also score each row with refitted down projections")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    folder = fallback_smollm2(print)
    ckpt = Checkpoint(folder)
    adapter = adapter_for(ckpt.config)
    layers = list(range(adapter.num_layers(ckpt.config)))
    act = adapter.activation_fn(ckpt.config)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    HELDOUT = torch.tensor([tokenizer((DATA / "heldout.txt").read_text())["input_ids"]])
    started = time.perf_counter()
    stats = calibration.collect(folder, adapter, layers, str(DATA / "calibration.txt"), args.tokens, 0,
                                coactivation=True, keep_inputs=args.refit, notify=print)
    print(f"calibration: {stats[0].tokens} tokens, {time.perf_counter() - started:.0f} s; "
          f"held-out: {HELDOUT.shape[1]} tokens", flush=True)
    ffns = [adapter.read_ffn(ckpt, i) for i in layers]
    dense = perplexity(model, HELDOUT)
    print(f"dense perplexity {dense:.2f}, router: {args.router}\n", flush=True)
    refit = " ppl ratio, router + refit |" if args.refit else ""
    print(f"| partition | shared | G | top-k | active share | ppl ratio, router | ppl ratio, oracle |{refit}")
    print("|---|---|---|---|---|---|---|" + ("---|" if args.refit else ""))
    for partition, G, S, k in QUICK if args.quick else FULL:
        spec = Spec(mode=Mode.SPLIT, experts=1, granularity=G, shared_experts=S, topk=k,
                    partition=Partition(partition), split_router=SplitRouter(args.router))
        # A shallow copy each: grouping uses up a layer's co-activation sums (stats.cc), every row needs them.
        groups = [neuron_groups(ffn, spec, i, copy.copy(stats[i])) for i, ffn in enumerate(ffns)]
        real = evaluate(model, ffns, act, stats, spec, groups, oracle=False) / dense
        best = evaluate(model, ffns, act, stats, spec, groups, oracle=True) / dense
        refitted = ""
        if args.refit:
            refitted = f" ×{evaluate(model, ffns, act, stats, spec, groups, False, refit=True) / dense:.2f} |"
        print(f"| {partition} | {S}/{G} | {G} | {k} | {(S + k) / G:.0%} | ×{real:.2f} | ×{best:.2f} |{refitted}",
              flush=True)
    print(f"| single neurons (reference) | 0 | {ffns[0].intermediate_size} | 50% | 50% | — | "
          f"×{neuron_oracle(model, ffns, act, 0.5) / dense:.2f} |")
    print(f"\n{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
