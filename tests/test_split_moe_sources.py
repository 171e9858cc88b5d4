"""moeify split on Qwen3-MoE, Qwen2-MoE and moeify remote-format sources: exact, each in its own format.

Tiny models (2 layers, hidden 32) built here; every expert is cut into G pieces with virtual groups.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from moeify.conversion import convert
from moeify.spec import Spec
from tests.fixtures import make_tiny, run_cli

TOKENS = torch.randint(3, 200, (2, 24), generator=torch.Generator().manual_seed(0))
QWEN_MOE = dict(hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_experts=4,
                num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                vocab_size=211, max_position_embeddings=128, rope_theta=3000.0, rms_norm_eps=1e-5,
                router_aux_loss_coef=0.02, bos_token_id=1, eos_token_id=2, pad_token_id=0)
SMALL_LLAMA = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, head_dim=8)


def make_qwen_moe(model_type: str, folder: Path, **overrides) -> Path:
    """A tiny Qwen-MoE with routers loud enough that top-k really picks different experts per token."""
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **(QWEN_MOE | overrides))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (1.0 if name.endswith("mlp.gate.weight") else 0.05))
    model.save_pretrained(folder)
    return folder


def load(folder: Path, **kwargs):
    model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, output_loading_info=True, **kwargs)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model


def logits(folder: Path, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return load(folder, **kwargs)(TOKENS).logits


def split(source: Path, out: Path, *options: object) -> dict:
    assert run_cli("split", source, "--output", out, *map(str, options)) == 0
    return json.loads((out / "config.json").read_text())


def assert_exact(source: Path, out: Path, **kwargs) -> None:
    before, after = logits(source, **kwargs), logits(out, **kwargs)
    assert (after - before).abs().max() < 1e-4


def routed_differently(folder: Path, **kwargs) -> bool:
    """Whether the source's routers pick different experts across tokens (else exactness proves little)."""
    model = load(folder, **kwargs)
    with torch.no_grad():
        out = model(TOKENS, output_router_logits=True)
    return any(len(set(r.reshape(-1, r.shape[-1]).argmax(-1).tolist())) > 1 for r in out.router_logits)


# ---------------------------------------------------------------------------- Qwen3-MoE


@pytest.mark.parametrize("norm_topk_prob,mlp_only", [(True, []), (False, [0])])
def test_qwen3_moe_split_stays_native_and_exact(tmp_path, norm_topk_prob, mlp_only):
    source = make_qwen_moe("qwen3_moe", tmp_path / "src", norm_topk_prob=norm_topk_prob, mlp_only_layers=mlp_only,
                           head_dim=8)
    split(source, tmp_path / "out", "--granularity", 2)
    config = AutoConfig.from_pretrained(tmp_path / "out")  # the experts' count is spelled as this version saves it
    assert config.model_type == "qwen3_moe" and config.architectures == ["Qwen3MoeForCausalLM"]
    assert (config.num_experts, config.num_experts_per_tok, config.moe_intermediate_size) == (8, 4, 8)
    assert (config.norm_topk_prob, config.mlp_only_layers) == (norm_topk_prob, mlp_only)
    assert (config.router_aux_loss_coef, config.intermediate_size) == (0.02, 48)
    assert routed_differently(source)
    assert_exact(source, tmp_path / "out")


# ---------------------------------------------------------------------------- Qwen2-MoE


def test_qwen2_moe_split_keeps_the_gated_shared_expert_and_is_exact(tmp_path):
    source = make_qwen_moe("qwen2_moe", tmp_path / "src", shared_expert_intermediate_size=40, norm_topk_prob=False)
    config = split(source, tmp_path / "out", "--granularity", 2)
    assert config["model_type"] == "qwen2_moe" and config["architectures"] == ["Qwen2MoeForCausalLM"]
    assert (config["num_experts"], config["num_experts_per_tok"], config["moe_intermediate_size"]) == (8, 4, 8)
    assert config["shared_expert_intermediate_size"] == 40 and config["norm_topk_prob"] is False
    assert routed_differently(source)
    assert_exact(source, tmp_path / "out")
    before, after = load_file(source / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    for name in ("shared_expert.up_proj.weight", "shared_expert_gate.weight"):
        assert torch.equal(before[f"model.layers.1.mlp.{name}"], after[f"model.layers.1.mlp.{name}"])


# ---------------------------------------------------------------------------- moeify remote checkpoints


def upcycled_remote(tmp_path: Path, **spec) -> Path:
    llama = make_tiny("llama", tmp_path / "llama", **SMALL_LLAMA)
    out = tmp_path / "remote"
    spec = dict(experts=4, topk=2, format="remote", shared_experts=1, noise=0.05, router_std=1.0) | spec
    convert(llama, out, Spec(**spec), source=str(llama))
    return out


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_remote_softmax_split_is_exact(tmp_path, norm_topk_prob):
    source = upcycled_remote(tmp_path)
    if not norm_topk_prob:  # the same checkpoint read without renormalised top-k weights
        path = source / "config.json"
        path.write_text(json.dumps(json.loads(path.read_text()) | {"moe": json.loads(path.read_text())["moe"]
                                                                    | {"norm_topk_prob": False}}))
    config = split(source, tmp_path / "out", "--granularity", 2)
    moe = config["moe"]
    assert config["model_type"] == "moeify" and moe["scoring"] == "softmax"
    assert (moe["num_experts"], moe["num_experts_per_tok"], moe["expert_intermediate_size"]) == (8, 4, 24)
    assert (moe["num_shared_experts"], moe["shared_intermediate_size"]) == (1, 48)
    assert moe["norm_topk_prob"] is norm_topk_prob
    assert routed_differently(source, trust_remote_code=True)
    assert_exact(source, tmp_path / "out", trust_remote_code=True)


def test_remote_unit_scoring_split_is_exact_without_scaling(tmp_path):
    """A dense split (unit weights, top-1 of 2) split again: each piece weighs 1, the pieces sum to the expert."""
    llama = make_tiny("llama", tmp_path / "llama", **SMALL_LLAMA)
    source = tmp_path / "unit"
    assert run_cli("split", llama, "--output", source, "--granularity", 2, "--topk", 1, "--partition", "contiguous",
                   "--router-init", "centroid") == 0
    config = split(source, tmp_path / "out", "--granularity", 2)
    moe = config["moe"]
    assert moe["scoring"] == "unit"
    assert (moe["num_experts"], moe["num_experts_per_tok"], moe["expert_intermediate_size"]) == (4, 2, 12)
    assert routed_differently(source, trust_remote_code=True)
    assert_exact(source, tmp_path / "out", trust_remote_code=True)


# ---------------------------------------------------------------------------- refusals


def refused(capsys, *args: object) -> str:
    capsys.readouterr()
    assert run_cli(*args) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_granularity_must_divide_the_expert_width(tmp_path, capsys):
    source = make_qwen_moe("qwen3_moe", tmp_path / "src", head_dim=8)
    line = refused(capsys, "split", source, "--granularity", 3, "--output", tmp_path / "out")
    assert "does not divide the intermediate size 16" in line
    assert not (tmp_path / "out").exists()


def test_remote_source_refuses_native_format(tmp_path, capsys):
    source = upcycled_remote(tmp_path)
    line = refused(capsys, "split", source, "--granularity", 2, "--format", "native", "--output", tmp_path / "out")
    assert "split into the remote format" in line
    assert not (tmp_path / "out").exists()


def test_moe_source_refuses_moe_layers_and_aux_free_bias(tmp_path, capsys):
    source = make_qwen_moe("qwen3_moe", tmp_path / "src", head_dim=8)
    line = refused(capsys, "split", source, "--granularity", 2, "--moe-layers", "1", "--output", tmp_path / "out")
    assert "drop --moe-layers" in line
    remote = upcycled_remote(tmp_path)
    path = remote / "config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps(config | {"moe": config["moe"] | {"aux_free_bias": True}}))
    line = refused(capsys, "split", remote, "--granularity", 2, "--output", tmp_path / "out")
    assert "aux_free_bias" in line
    assert not (tmp_path / "out").exists()
