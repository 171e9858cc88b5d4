"""Tiny random models built offline from transformers configs, and the real SmolLM2-135M."""

from __future__ import annotations

from pathlib import Path

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
