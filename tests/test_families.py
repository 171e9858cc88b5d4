"""Every dense family x every format it can target: upcycling is exact at init.

A tiny random model of each family is upcycled without and with shared experts and with a
subset of MoE layers; the result must load with no missing or unexpected keys, give the dense
logits within 1e-4 and the same greedy continuation.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from moeify.checkpoint import Checkpoint
from moeify.conversion import convert
from moeify.spec import Spec
from tests.fixtures import TINY, make_tiny

# Qwen2-MoE without shared experts has a width-0 shared expert; torch notes its init is a no-op.
pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")

# Variants of a family's tiny model (name -> family, config changes): Granite without mlp_bias
# is what Granite-MoE holds natively.
VARIANTS = {"granite-no-mlp-bias": ("granite", {"mlp_bias": False})}
FAMILIES = list(TINY) + list(VARIANTS)

# Request variants: options of the Spec.
CASES = {
    "plain": dict(),
    "shared": dict(shared_experts=2),
    "subset": dict(moe_layers="skip-first:1"),
    "granular-shared-subset": dict(granularity=2, shared_experts=1, moe_layers="0"),
    # Qwen2-MoE's construction for llama.cpp: uniform routing without renormalisation (down x E/k).
    "zero-router-shared": dict(router_init="zeros", shared_experts=1),
}


def native_target(family: str, case: str) -> str | None:
    """The target --format native must pick (None: no native format holds the request)."""
    if family in ("llama", "mistral"):
        return "mixtral" if case == "plain" else "qwen2_moe"  # Mixtral: no shared experts, every layer MoE
    if family == "qwen2":
        return "qwen2_moe"
    if family == "qwen3":
        return None if CASES[case].get("shared_experts") else "qwen3_moe"
    if family == "granite-no-mlp-bias":  # Granite-MoE(-Shared): every layer MoE
        return {"plain": "granitemoe", "shared": "granitemoeshared", "zero-router-shared": "granitemoeshared"}.get(case)
    return None


PARAMS = [
    pytest.param(family, case, fmt, id=f"{family}-{case}-{fmt}")
    for family in FAMILIES
    for case in CASES
    for fmt in (["native"] if native_target(family, case) else []) + ["remote"]
]

TOKENS = torch.tensor([[1, 17, 42, 5, 99, 160, 7, 23, 64, 3, 150, 88]])




@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> dict[str, tuple[Path, torch.Tensor, torch.Tensor]]:
    """Each family's tiny model once: its folder, logits and greedy continuation."""
    root = tmp_path_factory.mktemp("dense")
    models = {}
    for family in FAMILIES:
        kind, changes = VARIANTS.get(family, (family, {}))
        folder = make_tiny(kind, root / family, **changes)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        models[family] = (folder, *_run(model))
    return models


def _run(model) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    with torch.no_grad():
        logits = model(TOKENS).logits
        tokens = model.generate(TOKENS[:, :4], max_new_tokens=6, do_sample=False, pad_token_id=0)
    return logits, tokens


@pytest.mark.parametrize("family,case,fmt", PARAMS)
def test_upcycle_is_exact(dense, tmp_path, family, case, fmt):
    folder, dense_logits, dense_tokens = dense[family]
    spec = Spec(experts=4, topk=2, router_std=0.5, format=fmt, **CASES[case])
    result = convert(folder, tmp_path / "moe", spec, source=str(folder))
    assert result.target == (native_target(family, case) if fmt == "native" else "remote")

    model, info = AutoModelForCausalLM.from_pretrained(
        tmp_path / "moe", dtype=torch.float32, trust_remote_code=(fmt == "remote"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    logits, tokens = _run(model)
    assert (logits - dense_logits).abs().max().item() < 1e-4
    assert torch.equal(tokens, dense_tokens)
    assert _router_count(tmp_path / "moe") == len(result.moe_layers)
    assert len(result.moe_layers) < result.num_layers if "subset" in case else len(result.moe_layers) == result.num_layers


def _router_count(folder: Path) -> int:
    """How many layers of the written checkpoint hold a router: dense layers really stay dense."""
    names = Checkpoint(folder).names()
    routers = (".gate.weight", ".router.weight", ".router.layer.weight")  # Mixtral/Qwen, remote, Granite-MoE
    return sum(1 for n in names if n.endswith(routers) and "experts" not in n)
