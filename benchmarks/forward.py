"""Forward speed on CPU: moeify's remote-format MoE vs transformers' native Mixtral vs the dense source.

All three are built from configs (no download): a Llama of hidden 512 / intermediate 1536, its
remote-format MoE (8 experts, top-2) and a MixtralForCausalLM holding the very same weights, so
both MoEs route every token identically (the script checks their logits agree). Runs alternate
between the models and the medians are reported (and the best forward time, the least disturbed
one), so machine noise hits all of them alike.

    python benchmarks/forward.py [--runs 9] [--batch 4] [--seq 256] [--layers 4] [--decode 32] [--threads N]

Forward tokens/s is the prefill rate (one batched forward, no cache); decode tokens/s is greedy
generation of --decode tokens from a 16-token prompt with the KV cache, batch 1.
"""

from __future__ import annotations

import argparse
import statistics
import time

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--topk", type=int, default=2)
    parser.add_argument("--decode", type=int, default=32, help="new tokens per greedy generation (0: skip)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

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
