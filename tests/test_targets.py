"""Choosing the output format, and what each target writes: names, config fields, code files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from moeify.adapters import ADAPTERS, adapter_for
from moeify.conversion import convert
from moeify.errors import MoeifyError
from moeify.spec import Spec
from moeify.targets import choose
from moeify.targets.qwen_moe import shared_expert
from moeify.transforms import FFN, upcycle
from tests.fixtures import TINY, make_tiny, run_cli

TOKENS = torch.tensor([[1, 17, 42, 5, 99, 160, 7, 23, 64, 3, 150, 88]])




def tiny_config(family: str, **overrides) -> dict:
    return {"model_type": family, **TINY[family], **overrides}


def chosen(family: str, overrides: dict | None = None, **spec) -> tuple[str, str]:
    config = tiny_config(family, **(overrides or {}))
    adapter = adapter_for(config)
    spec_ = Spec(**spec)
    target, reason = choose(adapter, config, spec_, spec_.layers(adapter.num_layers(config)))
    return target.name, reason


# ---------------------------------------------------------------------------- choosing


@pytest.mark.parametrize("family,overrides,spec,target,why", [
    ("llama", {}, {}, "mixtral", "native"),
    ("mistral", {}, {}, "mixtral", "native"),
    ("llama", {}, {"shared_experts": 1}, "qwen2_moe", "native"),
    ("mistral", {}, {"moe_layers": "every:2"}, "qwen2_moe", "native"),
    ("qwen2", {}, {}, "qwen2_moe", "native"),
    ("qwen3", {}, {"moe_layers": "0"}, "qwen3_moe", "native"),
    ("qwen3", {}, {"shared_experts": 1}, "remote", "Qwen3-MoE has no shared experts"),
    ("qwen3", {"use_sliding_window": True, "max_window_layers": 1}, {}, "remote", "window"),
    ("llama", {"attention_bias": True}, {}, "remote", "attention"),
    ("llama", {"mlp_bias": True}, {"shared_experts": 1}, "remote", "qwen2_moe has no FFN biases"),
    ("granite", {"mlp_bias": False}, {}, "granitemoe", "native"),
    ("granite", {"mlp_bias": False}, {"shared_experts": 2}, "granitemoeshared", "native"),
    ("granite", {}, {}, "remote", "granitemoe experts have no biases (mlp_bias)"),
    ("granite", {"mlp_bias": False}, {"moe_layers": "1"}, "remote", "granitemoe makes every layer MoE"),
    ("gemma2", {}, {}, "remote", "no native MoE architecture holds gemma2"),
    ("gpt2", {}, {}, "remote", "no native MoE architecture holds gpt2"),
    ("llama", {}, {"format": "remote"}, "remote", "--format remote"),
])
def test_auto_prefers_an_exact_native_target(family, overrides, spec, target, why):
    name, reason = chosen(family, overrides, **spec)
    assert name == target
    assert why in reason


def test_native_when_impossible_says_why_and_suggests_remote():
    with pytest.raises(MoeifyError) as e:
        chosen("qwen3", shared_experts=2, format="native")
    message = str(e.value)
    assert "\n" not in message and "Qwen3-MoE has no shared experts" in message and "--format remote" in message
    with pytest.raises(MoeifyError, match="no native MoE architecture holds olmo2.*--format remote"):
        chosen("olmo2", format="native")


def test_unknown_family_lists_the_supported_ones():
    with pytest.raises(MoeifyError) as e:
        adapter_for({"model_type": "bloom"})
    assert "'bloom'" in str(e.value)
    assert all(family in str(e.value) for family in ADAPTERS)
    assert set(ADAPTERS) == {"llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "olmo2",
                             "granite", "gpt2", "gpt_neox"}


def test_mlp_bias_turns_on_ffn_biases():
    assert not adapter_for(tiny_config("llama")).bias
    names = adapter_for(tiny_config("llama", mlp_bias=True)).ffn_names(1)
    assert names["down_bias"] == "model.layers.1.mlp.down_proj.bias"


# ---------------------------------------------------------------------------- Qwen2-MoE


def test_shared_experts_become_one_gated_expert_with_the_same_output():
    """S shared copies -> one expert of width S*I whose output, times sigmoid(0) = 0.5, is their sum."""
    torch.manual_seed(0)
    H, I, S = 8, 6, 3
    ffn = FFN(gate=torch.randn(I, H), up=torch.randn(I, H), down=torch.randn(H, I))
    moe = upcycle(ffn, Spec(experts=4, topk=2, shared_experts=S), layer=0)
    merged = shared_expert(moe)
    assert merged.gate.shape == (S * I, H) and merged.down.shape == (H, S * I)
    x = torch.randn(5, H)

    def run(f: FFN) -> torch.Tensor:
        return (torch.nn.functional.silu(x @ f.gate.T) * (x @ f.up.T)) @ f.down.T

    expected = sum(run(s) for s in moe.shared)
    assert torch.allclose(torch.sigmoid(torch.zeros(1)) * run(merged), expected, atol=1e-6)
    assert shared_expert(upcycle(ffn, Spec(experts=4, topk=2), layer=0)).up.shape == (0, H)


def test_qwen2_moe_config_and_tensors(tmp_path):
    source = make_tiny("mistral", tmp_path / "mistral")  # 3 layers, sliding window 8
    spec = Spec(experts=4, topk=2, shared_experts=2, moe_layers="every:2", format="native")
    result = convert(source, tmp_path / "out", spec, source="mistral")
    assert result.target == "qwen2_moe" and result.moe_layers == [1]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == ["Qwen2MoeForCausalLM"]
    assert config["mlp_only_layers"] == [0, 2] and config["norm_topk_prob"] is True
    assert config["shared_expert_intermediate_size"] == 2 * 96 and config["moe_intermediate_size"] == 96
    assert config["head_dim"] == 16
    assert config["use_sliding_window"] and config["sliding_window"] == 8
    assert config["layer_types"] == ["sliding_attention"] * 3
    tensors = load_file(tmp_path / "out" / "model.safetensors")
    dense_down = load_file(source / "model.safetensors")["model.layers.1.mlp.down_proj.weight"]
    # For every engine (--engine any): zero q/k/v biases (vLLM's qwen2_moe always has them) and a
    # negligible non-zero gate (llama.cpp computes sigmoid as silu(x)/x, NaN at 0).
    assert config["qkv_bias"] is True and torch.equal(tensors["model.layers.2.self_attn.k_proj.bias"], torch.zeros(16))
    assert torch.equal(tensors["model.layers.1.mlp.shared_expert_gate.weight"], torch.full((1, 64), 2.0**-60))
    # Each shared copy carries 1/(S+1) of the FFN; doubled for the 0.5 gate.
    down = tensors["model.layers.1.mlp.shared_expert.down_proj.weight"]
    assert torch.allclose(down, torch.cat([dense_down, dense_down], dim=1) * 2 / 3)
    assert "model.layers.0.mlp.gate_proj.weight" in tensors  # dense layers keep their FFN


def test_output_dtype_covers_the_written_zeros(tmp_path):
    source = make_tiny("llama", tmp_path / "llama")
    spec = Spec(experts=4, topk=2, shared_experts=1, dtype="bfloat16")
    assert convert(source, tmp_path / "out", spec, source="llama").target == "qwen2_moe"
    tensors = load_file(tmp_path / "out" / "model.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"


def test_qwen2_source_keeps_its_qkv_biases(tmp_path):
    source = make_tiny("qwen2", tmp_path / "qwen2")
    convert(source, tmp_path / "out", Spec(experts=4, topk=1, engine="transformers"), source="qwen2")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["qkv_bias"] is True and config["shared_expert_intermediate_size"] == 1  # one zero neuron
    tensors = load_file(tmp_path / "out" / "model.safetensors")
    assert torch.equal(tensors["model.layers.0.self_attn.q_proj.bias"],
                       load_file(source / "model.safetensors")["model.layers.0.self_attn.q_proj.bias"])


def test_without_shared_experts_llamacpp_gets_a_zero_one_neuron_shared_expert(tmp_path):
    """llama.cpp's qwen2moe needs a shared expert in every layer: one zero neuron adds exactly 0."""
    source = make_tiny("qwen2", tmp_path / "qwen2")
    convert(source, tmp_path / "out", Spec(experts=4, topk=1), source="qwen2")  # --engine any
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["shared_expert_intermediate_size"] == 1
    tensors = load_file(tmp_path / "out" / "model.safetensors")
    for name in ("gate_proj", "up_proj", "down_proj"):
        assert not tensors[f"model.layers.1.mlp.shared_expert.{name}.weight"].any()


# ---------------------------------------------------------------------------- Granite-MoE


def test_granite_moe_writes_fused_experts_and_an_ungated_shared_mlp(tmp_path):
    """input_linear (E, 2I, H), each expert's gate rows before its up rows, as Granite-MoE splits it."""
    source = make_tiny("granite", tmp_path / "granite", mlp_bias=False)  # hidden 32, intermediate 48, 2 layers
    spec = Spec(experts=4, topk=2, granularity=2, shared_experts=2, format="native")
    assert convert(source, tmp_path / "out", spec, source="granite").target == "granitemoeshared"
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == ["GraniteMoeSharedForCausalLM"]
    assert (config["num_local_experts"], config["num_experts_per_tok"], config["intermediate_size"]) == (8, 4, 24)
    assert config["shared_intermediate_size"] == 2 * 48 and config["residual_multiplier"] == 0.5
    tensors, dense = load_file(tmp_path / "out" / "model.safetensors"), load_file(source / "model.safetensors")
    m, d = "model.layers.1.block_sparse_moe", "model.layers.1.mlp"
    fused = tensors[f"{m}.input_linear.weight"]
    assert fused.shape == (8, 48, 32) and tensors[f"{m}.output_linear.weight"].shape == (8, 32, 24)
    assert torch.equal(fused[3, :24], dense[f"{d}.gate_proj.weight"][24:])  # expert 3: copy 1, second piece
    assert torch.equal(fused[3, 24:], dense[f"{d}.up_proj.weight"][24:])
    assert tensors[f"{m}.router.layer.weight"].shape == (8, 32)
    shared = tensors["model.layers.1.shared_mlp.input_linear.weight"]
    assert shared.shape == (2 * 96, 32) and torch.equal(shared[:48], dense[f"{d}.gate_proj.weight"])
    assert torch.equal(shared[96:144], dense[f"{d}.up_proj.weight"])


# ---------------------------------------------------------------------------- remote


def test_remote_follows_the_contract(tmp_path):
    """gpt2: a plain GELU FFN with biases, stored transposed (Conv1D), becomes nn.Linear-shaped experts."""
    source = make_tiny("gpt2", tmp_path / "gpt2")
    spec = Spec(experts=4, topk=2, shared_experts=1, moe_layers="1")
    result = convert(source, tmp_path / "out", spec, source="gpt2")
    out = tmp_path / "out"
    assert result.target == "remote"
    assert {"configuration_moeify.py", "modeling_moeify.py"} <= {p.name for p in out.iterdir()}
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "moeify" and config["architectures"] == ["MoeifyForCausalLM"]
    assert config["auto_map"] == {"AutoConfig": "configuration_moeify.MoeifyConfig",
                                  "AutoModelForCausalLM": "modeling_moeify.MoeifyForCausalLM"}
    assert config["base_config"]["model_type"] == "gpt2" and config["base_config"]["n_inner"] == 48
    moe = config["moe"]
    assert moe["mlp_path"] == "transformer.h.{i}.mlp" and moe["moe_layers"] == [1]
    assert (moe["num_experts"], moe["num_experts_per_tok"], moe["num_shared_experts"]) == (4, 2, 1)
    assert (moe["expert_intermediate_size"], moe["shared_intermediate_size"]) == (48, 48)
    assert moe["hidden_act"] == "gelu_new" and moe["gated"] is False and moe["bias"] is True
    with safe_open(out / "model.safetensors", "pt") as f:
        shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    m = "transformer.h.1.mlp"
    assert shapes[f"{m}.router.weight"] == (4, 32)
    assert shapes[f"{m}.experts.3.up_proj.weight"] == (48, 32) and shapes[f"{m}.experts.3.up_proj.bias"] == (48,)
    assert shapes[f"{m}.experts.3.down_proj.weight"] == (32, 48) and shapes[f"{m}.experts.3.down_proj.bias"] == (32,)
    assert shapes[f"{m}.shared_experts.0.down_proj.weight"] == (32, 48)
    assert not any(".gate_proj." in name for name in shapes)
    assert shapes["transformer.h.0.mlp.c_fc.weight"] == (32, 48)  # the dense layer, untouched
    assert shapes["transformer.h.1.attn.c_attn.weight"] == (32, 96)


def test_legacy_gpt2_names_are_read_as_transformers_loads_them(tmp_path):
    """OpenAI's gpt2 files have no 'transformer.' prefix and carry causal-mask buffers."""
    source = make_tiny("gpt2", tmp_path / "gpt2")
    tensors = load_file(source / "model.safetensors")
    legacy = {name.removeprefix("transformer."): t for name, t in tensors.items() if name != "lm_head.weight"}
    legacy["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
    save_file(legacy, source / "model.safetensors", metadata={"format": "pt"})
    dense = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    convert(source, tmp_path / "out", Spec(experts=4, topk=2, router_std=0.5), source="gpt2")
    moe, info = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32,
                                                     trust_remote_code=True, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        assert (moe.eval()(TOKENS).logits - dense(TOKENS).logits).abs().max() < 1e-4


# ---------------------------------------------------------------------------- command line




def test_cli_shared_experts_and_layers_end_to_end(tmp_path, capsys):
    source = make_tiny("llama", tmp_path / "llama")
    out = tmp_path / "out"
    assert run_cli("upcycle", source, "-o", out, "--experts", 4, "--shared-experts", 1,
                   "--moe-layers", "skip-first:1") == 0
    format_line = next(line for line in capsys.readouterr().out.splitlines() if "format" in line)  # summary: stdout
    assert "qwen2_moe" in format_line and "native" in format_line
    record = json.loads((out / "moeify.json").read_text())
    assert record["target"] == "qwen2_moe" and record["moe_layer_indices"] == [1, 2]
    assert record["shared_experts"] == 1


def test_cli_native_refusal_is_one_line_and_writes_nothing(tmp_path, capsys):
    source = make_tiny("gemma2", tmp_path / "gemma2")
    capsys.readouterr()  # saving the tiny model printed transformers' progress
    assert run_cli("upcycle", source, "-o", tmp_path / "out", "--format", "native") == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "--format remote" in lines[0] and "gemma2" in lines[0]
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["gemma2"]
