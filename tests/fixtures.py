"""Tiny random models built offline from transformers configs, and the real SmolLM2-135M."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

# Small but not degenerate: non-default norms, rope and head sizes, so a target config that
# falls back to its own defaults changes the logits and the exactness tests notice.
TINY: dict[str, dict] = {
    "llama": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=24, rms_norm_eps=1e-6, vocab_size=211,
                  max_position_embeddings=256, rope_theta=5000.0, tie_word_embeddings=True,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0),
    "mistral": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=1, head_dim=16, rms_norm_eps=1e-5, vocab_size=211,
                    max_position_embeddings=256, rope_theta=20000.0, sliding_window=8,
                    tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
    # The other families: 2 layers, hidden 32, each with a few non-default fields of its own.
    "qwen2": dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=211, max_position_embeddings=128,
                  rope_theta=3000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0),
    "qwen3": dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5, vocab_size=211,
                  max_position_embeddings=128, rope_theta=7000.0, tie_word_embeddings=True,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0),
    "gemma2": dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=12, sliding_window=4,
                   final_logit_softcapping=20.0, attn_logit_softcapping=30.0, vocab_size=211,
                   max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0),
    "gemma3_text": dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=12, sliding_window=4,
                        layer_types=["sliding_attention", "full_attention"], vocab_size=211,
                        max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0),
    "phi3": dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=211, max_position_embeddings=128, rope_theta=4000.0,
                 bos_token_id=1, eos_token_id=2, pad_token_id=0),
    "olmo2": dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=211, max_position_embeddings=128,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0),
    # mlp_bias: a gated FFN with biases on every projection.
    "granite": dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=211, max_position_embeddings=128, mlp_bias=True,
                    embedding_multiplier=3.0, residual_multiplier=0.5, logits_scaling=2.0,
                    attention_multiplier=0.2, bos_token_id=1, eos_token_id=2, pad_token_id=0),
    "gpt2": dict(n_embd=32, n_inner=48, n_layer=2, n_head=4, n_positions=64, vocab_size=211,
                 bos_token_id=1, eos_token_id=2),
    "gpt_neox": dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                     vocab_size=211, max_position_embeddings=128, rotary_pct=0.5, bos_token_id=1,
                     eos_token_id=2),
}


def make_tiny(model_type: str, folder: Path, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> Path:
    """Save a tiny random model of a family into folder and return it."""
    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, **(TINY[model_type] | overrides))
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():  # random init leaves some weights at 0/1; make every tensor informative
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(folder)
    return Path(folder)


def logits(folder: Path, tokens: torch.Tensor, **kwargs) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs)
    with torch.no_grad():
        return model(tokens).logits


def run_cli(*args: object) -> int:
    """Run `moeify ARGS` in-process and return its exit code."""
    from moeify.cli import main

    previous = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as exit_:
            main([str(a) for a in args])
    finally:
        signal.signal(signal.SIGTERM, previous)  # main() installs its own handler
    return exit_.value.code
