"""Loading a checkpoint as a transformers model or tokenizer: the one place that decides whose code runs."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from moeify.checkpoint import _read_config
from moeify.errors import MoeifyError


def has_code(folder: Path) -> bool:
    """Whether the checkpoint ships its own modeling code (moeify's remote format): auto_map says so."""
    return "auto_map" in _read_config(Path(folder))


def load_model(folder: Path) -> nn.Module:
    """A float32 causal LM in eval mode; remote code only when the config asks for it (auto_map)."""
    from transformers import AutoModelForCausalLM

    try:
        model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                           trust_remote_code=has_code(folder),
                                                           output_loading_info=True)
    except Exception as e:
        raise MoeifyError(f"cannot load {folder} as a causal LM ({type(e).__name__}: {e})") from None
    missing = sorted(info.get("missing_keys") or [])
    if missing:  # transformers would run with random weights there: the comparison would be meaningless
        raise MoeifyError(f"{folder} lacks {len(missing)} weight(s) its config needs (e.g. {missing[0]}); "
                          f"the checkpoint is incomplete or mis-named")
    return model.eval()


def tokenizer_in(folder: Path):
    """The tokenizer saved in a folder, or None when it has none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=has_code(folder))
    except Exception:  # no or unreadable tokenizer files
        return None
