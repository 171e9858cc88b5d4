"""Forward speed on CPU: moeify's remote-format MoE vs transformers' native Mixtral vs the dense source;
with --splits, fine-grained splits of SmolLM2-135M vs SmolLM2 itself.

All three are built from configs (no download): a Llama of hidden 512 / intermediate 1536, its
remote-format MoE (8 experts, top-2) and a MixtralForCausalLM holding the very same weights, so
both MoEs route every token identically (the script checks their logits agree). Runs alternate
between the models and the medians are reported (and the best forward time, the least disturbed
one), so machine noise hits all of them alike.

    python benchmarks/forward.py [--runs 9] [--batch 4] [--seq 256] [--layers 4] [--decode 32] [--threads N]

Forward tokens/s is the prefill rate (one batched forward, no cache); decode tokens/s is greedy
generation of --decode tokens from a 16-token prompt with the KV cache, batch 1.

    python benchmarks/forward.py --splits 8 64 256 [--source DIR] [--work DIR] [--kernels] [--threads 1]

Splits SmolLM2-135M-Instruct (float32, the cached copy unless --source) at each G into G experts,
top-G/2 (50 % active, remote format, unit scoring) with `moeify split --partition contiguous
--router-init centroid` (no calibration: the routing quality does not change the speed), kept in
--work for the next run, and times prefill (batch 1 x --seq tokens of English text) and decode
against the dense model, alternating models per run; medians. --kernels adds each expert kernel
forced on one MoE block, one token and --seq tokens, to show what the automatic choice picks from.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

from moeify.targets.remote_code.configuration_moeify import MoeifyConfig
from moeify.targets.remote_code.modeling_moeify import MoeifyForCausalLM


def dense_config(args: argparse.Namespace) -> LlamaConfig:
    return LlamaConfig(hidden_size=512, intermediate_size=1536, num_hidden_layers=args.layers,
                       num_attention_heads=8, num_key_value_heads=4, vocab_size=8192,
                       max_position_embeddings=4096, tie_word_embeddings=False)


def remote_moe(dense: LlamaConfig, args: argparse.Namespace) -> MoeifyForCausalLM:
    """A remote-format MoE with random (distinct) experts and router, so routing spreads out."""
    moe = dict(mlp_path="model.layers.{i}.mlp", moe_layers=list(range(dense.num_hidden_layers)),
               num_experts=args.experts, num_experts_per_tok=args.topk,
               expert_intermediate_size=dense.intermediate_size, hidden_act="silu")
    torch.manual_seed(0)
    return MoeifyForCausalLM(MoeifyConfig(base_config=dense.to_dict(), moe=moe)).eval()


def native_mixtral(dense: LlamaConfig, remote: MoeifyForCausalLM, args: argparse.Namespace) -> MixtralForCausalLM:
    """transformers' MixtralForCausalLM with the same shapes, loaded with the remote model's weights."""
    config = MixtralConfig(**{k: getattr(dense, k) for k in (
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
        "vocab_size", "max_position_embeddings", "tie_word_embeddings", "rms_norm_eps")},
        rope_parameters=dict(dense.rope_parameters), num_local_experts=args.experts, num_experts_per_tok=args.topk)
    mixtral = MixtralForCausalLM(config).eval()
    state = {k: v for k, v in remote.state_dict().items() if ".mlp." not in k}
    for i in range(dense.num_hidden_layers):
        block = remote.model.layers[i].mlp
        experts = block.experts
        state[f"model.layers.{i}.mlp.gate.weight"] = block.router.weight
        state[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([e.gate_proj.weight, e.up_proj.weight]) for e in experts])
        state[f"model.layers.{i}.mlp.experts.down_proj"] = torch.stack([e.down_proj.weight for e in experts])
    mixtral.load_state_dict(state, strict=True)
    return mixtral


def seconds(model: torch.nn.Module, tokens: torch.Tensor) -> float:
    with torch.inference_mode():
        started = time.perf_counter()
        model(tokens, use_cache=False)
        return time.perf_counter() - started


def decode_seconds(model, prompt: torch.Tensor, new_tokens: int) -> float:
    """Greedy generation with the KV cache: one token per forward, so per-call overhead shows."""
    with torch.inference_mode():
        started = time.perf_counter()
        model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        return time.perf_counter() - started


DATA = Path(__file__).parent / "data"


def split_folder(source: Path, work: Path, granularity: int) -> Path:
    """SmolLM2 split into `granularity` experts, top half, written by moeify split unless already in work."""
    folder = work / f"smollm2-g{granularity}"
    if not (folder / "config.json").is_file():
        print(f"writing {folder} (moeify split --granularity {granularity})", flush=True)
        subprocess.run([sys.executable, "-m", "moeify", "split", str(source), "--granularity", str(granularity),
                        "--topk", str(granularity // 2), "--partition", "contiguous", "--router-init", "centroid",
                        "--format", "remote", "--output", str(folder)], check=True, capture_output=True)
    return folder


def block_kernels(blocks: dict, seq: int, runs: int) -> None:
    """Each expert kernel forced on one MoE block per model: ms per call, one token and seq tokens."""
    from moeify.targets.remote_code.modeling_moeify import Kernel

    print(f"\none MoE block (layer 0), ms per call, median of {runs}; * = the automatic choice")
    print(f"{'model':<18} {'tokens':>6} " + " ".join(f"{k.value:>9}" for k in Kernel))
    for name, block in blocks.items():
        for tokens in (1, seq):
            x = torch.randn(tokens, block.router.in_features, generator=torch.Generator().manual_seed(0))
            with torch.inference_mode():
                chosen = block.plan(x)
                cells = []
                for kernel in Kernel:
                    if kernel is Kernel.GATHER and tokens > 1:  # a copy of the weights per token: seconds
                        cells.append(f"{'-':>9} ")
                        continue
                    block.kernel = kernel
                    block(x)  # warm-up
                    cells.append(f"{1000 * statistics.median(timed(block, x) for _ in range(runs)):>8.2f}"
                                 + ("*" if kernel is chosen else " "))
                block.kernel = None
            print(f"{name:<18} {tokens:>6} " + " ".join(cells))


def timed(module: torch.nn.Module, x: torch.Tensor) -> float:
    started = time.perf_counter()
    module(x)
    return time.perf_counter() - started


def splits_main(args: argparse.Namespace) -> None:
    """SmolLM2 split at each G next to the dense model: prefill and decode tokens/s, and their ratios."""
    from transformers import AutoTokenizer
    from transformers.utils import logging

    from moeify.loading import Code, load_model
    from moeify.source import fallback_smollm2

    logging.disable_progress_bar()
    source = Path(args.source) if args.source else fallback_smollm2(print)
    work = Path(args.work or Path(tempfile.gettempdir()) / "moeify-forward-bench")
    models = {"dense SmolLM2": load_model(source, Code.FAMILY)}
    for g in args.splits:
        models[f"G={g} top-{g // 2}"] = load_model(split_folder(source, work, g), Code.MOEIFY)
    text = (DATA / "heldout.txt").read_text()
    tokens = torch.tensor([AutoTokenizer.from_pretrained(source)(text)["input_ids"][: args.seq]])
    assert tokens.shape[1] == args.seq, f"heldout.txt has only {tokens.shape[1]} tokens"
    prompt = tokens[:, :16]
    for model in models.values():  # warm-up: allocator, kernels, packed stacks
        seconds(model, tokens)
        decode_seconds(model, prompt, 2)
    prefill: dict[str, list[float]] = {name: [] for name in models}
    decode: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.runs):
        for name, model in models.items():
            prefill[name].append(seconds(model, tokens))
            decode[name].append(decode_seconds(model, prompt, args.decode))
    rate = {name: args.seq / statistics.median(t) for name, t in prefill.items()}
    step = {name: args.decode / statistics.median(t) for name, t in decode.items()}
    dense = next(iter(models))
    print(f"SmolLM2-135M-Instruct float32, prefill 1x{args.seq} tokens, decode {args.decode} tokens after a "
          f"16-token prompt, {torch.get_num_threads()} thread(s), median of {args.runs}, models alternating")
    print(f"{'model':<18} {'prefill tok/s':>14} {'x dense':>8} {'decode tok/s':>13} {'x dense':>8}  targets")
    for name in models:
        ratios = rate[name] / rate[dense], step[name] / step[dense]
        verdict = "" if name == dense else "prefill " + ("met" if ratios[0] >= 0.8 else "MISSED") + \
            ", decode " + ("met" if ratios[1] >= 0.5 else "MISSED")
        print(f"{name:<18} {rate[name]:>14.1f} {ratios[0]:>8.2f} {step[name]:>13.2f} {ratios[1]:>8.2f}  {verdict}")
    if args.kernels:
        blocks = {name: model.model.layers[0].mlp for name, model in models.items() if name != dense}
        block_kernels(blocks, args.seq, max(3, args.runs // 2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--splits", type=int, nargs="*", help="SmolLM2 split at these granularities vs dense")
    parser.add_argument("--source", help="--splits: the dense SmolLM2 folder (default: the cached one)")
    parser.add_argument("--work", help="--splits: where the splits are written and kept (default: a temp dir)")
    parser.add_argument("--kernels", action="store_true", help="--splits: also time each kernel on one block")
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 256; --splits: 512)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--topk", type=int, default=2)
    parser.add_argument("--decode", type=int, default=32, help="new tokens per greedy generation (0: skip)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.seq = args.seq or (512 if args.splits else 256)
    if args.splits:
        return splits_main(args)

    config = dense_config(args)
    remote = remote_moe(config, args)
    models = {
        "moeify remote MoE": remote,
        "transformers Mixtral": native_mixtral(config, remote, args),
        "dense Llama": LlamaForCausalLM(config).eval(),
    }
    tokens = torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        gap = (remote(tokens).logits - models["transformers Mixtral"](tokens).logits).abs().max().item()
    times: dict[str, list[float]] = {name: [] for name in models}
    decode: dict[str, list[float]] = {name: [] for name in models}
    prompt = tokens[:1, :16]
    for name, model in models.items():  # warm-up: allocator and kernels
        seconds(model, tokens)
    for _ in range(args.runs):
        for name, model in models.items():
            times[name].append(seconds(model, tokens))
            if args.decode:
                decode[name].append(decode_seconds(model, prompt, args.decode))

    rate = {name: args.batch * args.seq / statistics.median(t) for name, t in times.items()}
    step = {name: args.decode / statistics.median(t) for name, t in decode.items() if t}
    print(f"{args.batch}x{args.seq} tokens per forward, hidden 512, intermediate 1536, {args.layers} layers, "
          f"{args.experts} experts top-{args.topk}, {torch.get_num_threads()} threads, median of {args.runs}")
    print(f"{'model':<22} {'forward tok/s':>14} {'ms/forward':>11} {'best ms':>8} {'decode tok/s':>13}")
    for name in models:
        decoded = f"{step[name]:>13.1f}" if name in step else f"{'-':>13}"
        print(f"{name:<22} {rate[name]:>14.0f} {1000 * statistics.median(times[name]):>11.1f} "
              f"{1000 * min(times[name]):>8.1f} {decoded}")
    remote, native, dense = "moeify remote MoE", "transformers Mixtral", "dense Llama"
    print(f"forward: remote / Mixtral {rate[remote] / rate[native]:.2f}x, "
          f"remote / dense {rate[remote] / rate[dense]:.2f}x"
          + (f"; decode: remote / Mixtral {step[remote] / step[native]:.2f}x" if step else "")
          + f" (max |logit gap| remote vs Mixtral: {gap:.1e})")


if __name__ == "__main__":
    main()
