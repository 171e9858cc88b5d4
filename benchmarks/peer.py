"""PEER layers: training-free quality on SmolLM2-135M, and retrieval cost at a million experts.

    python benchmarks/peer.py quality              # perplexity ratios at 50 / 25 / 10 % active (~20-40 min)
    python benchmarks/peer.py quality --quick      # the 50 % rows only
    python benchmarks/peer.py retrieval            # one layer, N = 1024² experts, hidden 1024 (~4.5 GB, bfloat16)

quality: SmolLM2-135M-Instruct (moeify's offline copy); calibration text benchmarks/data/
calibration.txt (topped up with samples from the model, as `moeify peer` does), held-out text
benchmarks/data/heldout.txt. Every FFN becomes the PeerBlock `moeify peer` writes (the same
plan, transform and tensor names, loaded into the remote code's block), and the model runs
in-process. Beside it, at the same share of neurons per token: the per-neuron oracle (each
token keeps the neurons with the largest contributions |act(g·x)(u·x)|·|d|: a bound for any
retrieval) and split's best layout (256 pieces, 1/8 shared, fitted router). Recall: the share
of the oracle's neurons the retrieval found, on the held-out tokens, over every layer.

retrieval: one PeerBlock with N = 1,048,576 single-neuron experts (the non-gated form: an up
row and a down row each, bfloat16), hidden 1024, 8 heads of top-16, key size 256, synthetic
weights. Product-key retrieval against a flat top-k over all N scores of the same keys, per
token, in the same run; then the layer's forward throughput.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))  # split_quality's helpers
import split_quality  # noqa: E402
from split_quality import DATA, SplitFFN, evaluate, perplexity  # noqa: E402

from moeify import calibration  # noqa: E402
from moeify.adapters import adapter_for  # noqa: E402
from moeify.checkpoint import Checkpoint  # noqa: E402
from moeify.peer import PeerSpec, peer_ffn, plan_layer, retrieval_recall  # noqa: E402
from moeify.spec import Mode, Partition, Retrieval, Spec, SplitRouter  # noqa: E402
from moeify.split import neuron_groups  # noqa: E402
from moeify.targets.peer import PEER  # noqa: E402
from moeify.targets.remote_code.configuration_moeify import peer_section  # noqa: E402
from moeify.targets.remote_code.modeling_moeify import PeerBlock  # noqa: E402

# (share of neurons per token, shared share, heads, retrieval) rows; split's (G, shared, top-k) at the same share.
# Rows retrieval sets its own heads (two per grid row for SmolLM2's gated FFNs) and a quota per row; its
# shared neurons fill what the quota leaves of the share (50 %: 66 + 39 rows x 2 heads x 9 = 768 of 1536).
UP, ROWS_ = Retrieval.UP, Retrieval.ROWS
ROWS = [(0.5, 0.0, 1, UP), (0.5, 0.125, 1, UP), (0.5, 0.125, 2, UP), (0.5, 0.0, 1, ROWS_), (0.5, 66 / 1536, 1, ROWS_),
        (0.25, 0.0, 1, UP), (0.25, 0.0625, 1, UP), (0.25, 72 / 1536, 1, ROWS_), (0.1, 0.0, 1, UP),
        (0.1, 0.03125, 1, UP), (0.1, 76 / 1536, 1, ROWS_)]
QUICK = [(0.5, 0.0, 1, UP), (0.5, 0.125, 1, UP), (0.5, 0.0, 1, ROWS_), (0.5, 66 / 1536, 1, ROWS_)]
SPLIT = {0.5: (256, 32, 96), 0.25: (256, 16, 48), 0.1: (256, 8, 18)}


class Installed:
    """FFN modules of a Llama-style model swapped for others within a `with`, restored after."""

    def __init__(self, model, modules: list[torch.nn.Module]):
        self.model, self.modules = model, modules

    def __enter__(self):
        self.old = [layer.mlp for layer in self.model.model.layers]
        for layer, module in zip(self.model.model.layers, self.modules):
            layer.mlp = module
        return self

    def __exit__(self, *exc):
        for layer, module in zip(self.model.model.layers, self.old):
            layer.mlp = module


def peer_block(adapter, config: dict, ffn, spec: PeerSpec, layer: int, stats) -> PeerBlock:
    """The layer `moeify peer` would write, loaded into the remote code's PeerBlock."""
    built = peer_ffn(ffn, spec, layer, plan_layer(ffn, spec, layer, stats))
    section = PEER.config(adapter, config, spec, [layer], built, torch.float32).peer
    block = PeerBlock(peer_section(section, None), ffn.hidden_size)
    prefix = adapter.mlp_path(layer) + "."
    block.load_state_dict({name.removeprefix(prefix): take(built) for name, take in
                           PEER.moe_tensors(adapter, layer, built)})
    return block.eval()


class Measured(torch.nn.Module):
    """A PeerBlock computed as every slot's activation masked to the slots its retrieval chose.

    The same sum as the block's own gathered rows (unit weights: a chosen neuron weighs 1, once),
    checked on the first call, in a fraction of the time when half the neurons are chosen. Also
    counts the retrieval's recall of the oracle's choice.
    """

    def __init__(self, block: PeerBlock):
        super().__init__()
        self.block, self.found, self.wanted, self.checked = block, 0, 0, False
        self.tokens = 0  # wanted / tokens: distinct routed neurons per token (heads may pick the same)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        b, x = self.block, hidden.reshape(-1, hidden.shape[-1])
        chosen = torch.zeros(len(x), b.n * b.n).scatter_(1, b.retrieve(x)[0].flatten(1), 1.0)
        up = x @ b.up_rows.T
        out = (b.act_fn(x @ b.gate_rows.T) * up * chosen) @ b.down_rows
        if b.shared is not None:
            out = out + b.shared(x)
        if not self.checked:  # the measurement computes what the block does
            assert torch.allclose(out[:16], b(x[:16]), atol=1e-4, rtol=1e-4)
            self.checked = True
        found, wanted = retrieval_recall(b, x)
        self.found, self.wanted, self.tokens = self.found + found, self.wanted + wanted, self.tokens + len(x)
        return out.reshape(hidden.shape)


def peer_row(model, adapter, config, ffns, stats, share: float, shared: float, heads: int,
             retrieval: Retrieval) -> tuple[float, float, float, PeerBlock]:
    """Held-out perplexity with every FFN a PEER layer, the retrieval's recall of the oracle's choice, the
    share of neurons a token really uses (shared counted; below `share` when heads pick the same neurons,
    or when rows retrieval's quota per row rounds down), and the first layer's block."""
    I = ffns[0].intermediate_size
    S = int(round(shared * I))
    routed = max(1, int(round(share * I)) - S)  # rows retrieval: --topk is the neurons per token
    topk = routed if retrieval is Retrieval.ROWS else routed // heads
    spec = PeerSpec(granularity=I, topk=topk, heads=heads, shared_experts=S, retrieval=retrieval)
    blocks = [Measured(peer_block(adapter, config, ffn, spec, i, stats[i])) for i, ffn in enumerate(ffns)]
    with Installed(model, blocks):
        ppl = perplexity(model, split_quality.HELDOUT)
    used = sum(b.wanted for b in blocks) / sum(b.tokens for b in blocks) + S
    return ppl, sum(b.found for b in blocks) / max(sum(b.wanted for b in blocks), 1), used / I, blocks[0].block


def oracle(model, ffns, act, share: float) -> float:
    """Per token, the share of neurons with the largest contributions (split_quality's neuron reference)."""
    I = ffns[0].intermediate_size
    modules = [SplitFFN(f, act, torch.arange(I), torch.zeros(I, f.hidden_size), int(round(share * I)), oracle=True)
               for f in ffns]
    with Installed(model, modules):
        return perplexity(model, split_quality.HELDOUT)


def split_row(model, ffns, act, stats, share: float) -> float:
    G, S, k = SPLIT[share]
    spec = Spec(mode=Mode.SPLIT, experts=1, granularity=G, shared_experts=S, topk=k,
                partition=Partition.ACTIVATION, split_router=SplitRouter.FIT)
    groups = [neuron_groups(ffn, spec, i, stats[i])[1] for i, ffn in enumerate(ffns)]
    return evaluate(model, ffns, act, stats, spec, groups, oracle=False)


def quality(quick: bool, tokens: int) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moeify.source import fallback_smollm2

    torch.set_grad_enabled(False)
    torch.set_num_threads(1)  # placement's small products: one thread is many times faster on a busy machine
    folder = fallback_smollm2(print)
    ckpt = Checkpoint(folder)
    adapter = adapter_for(ckpt.config)
    layers = list(range(adapter.num_layers(ckpt.config)))
    act = adapter.activation_fn(ckpt.config)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    split_quality.HELDOUT = torch.tensor([tokenizer((DATA / "heldout.txt").read_text())["input_ids"]])
    started = time.perf_counter()
    stats = calibration.collect(folder, adapter, layers, str(DATA / "calibration.txt"), tokens, 0,
                                coactivation=True, notify=print)  # co-activation: for split's rows
    ffns = [adapter.read_ffn(ckpt, i).map(lambda role, t: t.float()) for i in layers]
    dense = perplexity(model, split_quality.HELDOUT)
    print(f"calibration {stats[0].tokens} tokens, {time.perf_counter() - started:.0f} s; held-out "
          f"{split_quality.HELDOUT.shape[1]} tokens; dense perplexity {dense:.2f}\n", flush=True)
    print("| active share | retrieval | shared | heads | top-k per head | used | ppl ratio, PEER | recall "
          "| ppl ratio, oracle | ppl ratio, split (best) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    done: dict[float, tuple[float, float]] = {}
    for share, shared, heads, retrieval in QUICK if quick else ROWS:
        if share not in done:
            done[share] = (oracle(model, ffns, act, share) / dense, split_row(model, ffns, act, stats, share) / dense)
        ppl, recall, used, block = peer_row(model, adapter, ckpt.config, ffns, stats, share, shared, heads, retrieval)
        S = int(round(shared * ffns[0].intermediate_size))
        print(f"| {share:.0%} | {retrieval.value} | {S} | {block.heads} | {block.top_k} | {used:.1%} "
              f"| ×{ppl / dense:.2f} "
              f"| {recall:.1%} | ×{done[share][0]:.2f} | ×{done[share][1]:.2f} |", flush=True)
    print(f"\n{time.perf_counter() - started:.0f} s")


# ---------------------------------------------------------------------------- retrieval cost


def synthetic_layer(experts: int, hidden: int, heads: int, topk: int, key_dim: int) -> PeerBlock:
    """A PeerBlock of non-gated single-neuron experts with random bfloat16 weights, built without a float32 copy."""
    section = peer_section(dict(num_neurons=experts, num_heads=heads, num_neurons_per_head=topk, key_dim=key_dim,
                                gated=False, hidden_act="gelu", scoring="softmax"), None)
    with torch.device("meta"):
        block = PeerBlock(section, hidden)
    gen = torch.Generator().manual_seed(0)

    def param(*shape: int, scale: float) -> torch.nn.Parameter:
        out = torch.empty(*shape, dtype=torch.bfloat16)
        for rows in out.split(65536):  # chunked: float32 noise for one chunk at a time
            rows.copy_(torch.randn(rows.shape, generator=gen) * scale)
        return torch.nn.Parameter(out, requires_grad=False)

    block.up_rows = param(block.n ** 2, hidden, scale=hidden ** -0.5)
    block.down_rows = param(block.n ** 2, hidden, scale=hidden ** -0.5)
    block.query = torch.nn.Linear(hidden, heads * key_dim, bias=False, dtype=torch.bfloat16)
    block.sub_keys = param(heads, 2, block.n, key_dim // 2, scale=(key_dim // 2) ** -0.5)
    return block.eval()


def flat_topk(block: PeerBlock, x: torch.Tensor) -> torch.Tensor:
    """The same retrieval without product keys: all N = n² scores per token and head, then their top-k values."""
    # The half-scores exactly as PeerBlock.retrieve computes them (float32), so both rank the same scores.
    q = torch.nn.functional.linear(x.float(), block.query.weight.float()).view(len(x), block.heads, 2, block.half)
    halves = torch.einsum("thpd,hpnd->thpn", q, block.sub_keys.float())
    scores = (halves[:, :, 0, :, None] + halves[:, :, 1, None, :]).flatten(-2)  # (T, heads, N)
    return scores.topk(block.top_k, dim=-1).values


def best_time(fn, repeats: int) -> tuple[float, float]:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times), sorted(times)[len(times) // 2]


def retrieval(experts: int, hidden: int, heads: int, topk: int, key_dim: int, threads: int, repeats: int) -> None:
    torch.set_grad_enabled(False)
    torch.set_num_threads(threads)
    started = time.perf_counter()
    block = synthetic_layer(experts, hidden, heads, topk, key_dim)
    weights = sum(p.numel() * p.element_size() for p in block.parameters())
    print(f"PEER layer: N = {block.n}² = {block.n ** 2:,} experts (up + down rows), hidden {hidden}, {heads} heads "
          f"x top-{topk}, key size {key_dim}, bfloat16, {weights / 2**30:.2f} GiB; built in "
          f"{time.perf_counter() - started:.0f} s; {threads} threads, best and median of {repeats}")
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(256, hidden, generator=gen).to(torch.bfloat16)
    few = x[:8]  # the flat search holds T x heads x N float32 scores
    # The same top-k scores (bfloat16 keys tie often, so compare scores, not which of tied slots)
    assert torch.equal(block.retrieve(few)[1].sort(-1).values, flat_topk(block, few).sort(-1).values)
    product = best_time(lambda: block.retrieve(x), repeats)
    product_few = best_time(lambda: block.retrieve(few), repeats)  # the flat search's batch: like for like
    flat = best_time(lambda: flat_topk(block, few), repeats)
    per_token = lambda t, tokens: t * 1e6 / tokens  # noqa: E731  µs
    print(f"retrieval per token: product keys {per_token(product[0], len(x)):.1f} µs at {len(x)} tokens (median "
          f"{per_token(product[1], len(x)):.1f}), {per_token(product_few[0], len(few)):.1f} µs at {len(few)}; "
          f"flat top-k over all N {per_token(flat[0], len(few)):.0f} µs at {len(few)} (median "
          f"{per_token(flat[1], len(few)):.0f}); same top-k scores found")
    print(f"product keys faster by {flat[0] / product_few[0]:.0f}x at {len(few)} tokens each (medians "
          f"{flat[1] / product_few[1]:.0f}x), {flat[0] / len(few) / (product[0] / len(x)):.0f}x against "
          f"batched product keys")
    forward = best_time(lambda: block(x.unsqueeze(0)), repeats)
    decode = best_time(lambda: block(x[:1].unsqueeze(0)), repeats)
    print(f"forward of the layer, {len(x)} tokens: {len(x) / forward[0]:.0f} tokens/s (median "
          f"{len(x) / forward[1]:.0f}); one token: {1 / decode[0]:.0f} tokens/s (median {1 / decode[1]:.0f})")


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="what", required=True)
    q = sub.add_parser("quality")
    q.add_argument("--quick", action="store_true")
    q.add_argument("--tokens", type=int, default=PeerSpec.calibration_tokens, help="calibration tokens")
    r = sub.add_parser("retrieval")
    r.add_argument("--experts", type=int, default=1024 ** 2)
    r.add_argument("--hidden", type=int, default=1024)
    r.add_argument("--heads", type=int, default=8)
    r.add_argument("--topk", type=int, default=16)
    r.add_argument("--key-dim", type=int, default=256)
    r.add_argument("--threads", type=int, default=2)
    r.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.what == "quality":
        quality(args.quick, args.tokens)
    else:
        retrieval(args.experts, args.hidden, args.heads, args.topk, args.key_dim, args.threads, args.repeats)


if __name__ == "__main__":
    main()
