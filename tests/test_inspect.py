"""`moeify inspect`: parameter arithmetic from config.json alone, checked against published figures,
against transformers' own models, and against what a conversion really writes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from moeify import anatomy, hub
from moeify.anatomy import Kind, describe, upcycled
from moeify.checkpoint import Checkpoint
from moeify.conversion import convert
from moeify.spec import Format, Spec
from tests.fixtures import TINY, make_tiny, run_cli

# Published configs, written out here: no downloads.
MISTRAL_7B = dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=False,
                  hidden_act="silu", torch_dtype="bfloat16")
QWEN15_MOE_A27B = dict(model_type="qwen2_moe", hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
                       num_attention_heads=16, num_key_value_heads=16, num_experts=60, num_experts_per_tok=4,
                       moe_intermediate_size=1408, shared_expert_intermediate_size=5632, vocab_size=151936,
                       tie_word_embeddings=False, qkv_bias=True, decoder_sparse_step=1, mlp_only_layers=[])
DEEPSEEKMOE_16B = dict(model_type="deepseek", hidden_size=2048, intermediate_size=10944, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=16, n_routed_experts=64, n_shared_experts=2,
                       num_experts_per_tok=6, moe_intermediate_size=1408, first_k_dense_replace=1, moe_layer_freq=1,
                       vocab_size=102400, tie_word_embeddings=False, attention_bias=False)


def billions(n: int) -> float:
    return n / 1e9


def test_mistral_7b_upcycled_is_mixtral_8x7b():
    dense = describe(MISTRAL_7B)
    assert billions(dense.total) == pytest.approx(7.24, abs=0.01)  # Mistral-7B's published size
    plan = upcycled(MISTRAL_7B, Spec(experts=8, topk=2))
    assert billions(plan.result.total) == pytest.approx(46.7, abs=0.1)
    assert billions(plan.result.active) == pytest.approx(12.9, abs=0.1)
    assert plan.target == "mixtral"
    assert plan.disk == plan.result.total * 2  # bfloat16, the source's dtype
    # Mixtral-8x7B's own config reads back the same numbers.
    mixtral = describe(MISTRAL_7B | {"model_type": "mixtral", "num_local_experts": 8, "num_experts_per_tok": 2})
    assert (mixtral.total, mixtral.active) == (plan.result.total, plan.result.active)
    # Streaming: memory is about one layer's FFN a few times over, not the 93 GB output.
    assert 1e9 < plan.peak_memory < 3e9


def test_qwen15_moe_a27b():
    model = describe(QWEN15_MOE_A27B)
    assert model.kind is Kind.NATIVE
    assert billions(model.total) == pytest.approx(14.3, abs=0.1)
    assert billions(model.active) == pytest.approx(2.7, abs=0.1)
    [(layers, block)] = model.groups()
    assert layers == list(range(24)) and (block.experts, block.topk, block.shared_experts) == (60, 4, 1)
    assert (block.expert_width, block.shared_width) == (1408, 5632)


def test_deepseekmoe_16b():
    model = describe(DEEPSEEKMOE_16B)
    assert billions(model.total) == pytest.approx(16.4, abs=0.1)
    assert billions(model.active) == pytest.approx(2.8, abs=0.1)
    (dense_layers, dense), (moe_layers, moe) = model.groups()
    assert dense_layers == [0] and not dense.moe
    assert moe_layers == list(range(1, 28)) and (moe.experts, moe.topk, moe.shared_experts) == (64, 6, 2)
    assert moe.expert_width == moe.shared_width == 1408


def stored_params(folder: Path) -> int:
    return sum(math.prod(info.shape) for info in Checkpoint(folder).tensors.values())


@pytest.mark.parametrize("family", sorted(TINY))
def test_dense_family_counts_every_stored_tensor(family, tmp_path):
    """Norms, biases, tied or untied heads, learned positions: the count equals the safetensors'."""
    folder = make_tiny(family, tmp_path / family)
    config = json.loads((folder / "config.json").read_text())
    assert describe(config).total == stored_params(folder)
    assert describe(config).kind is Kind.DENSE


MOE_SMALL = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=101, bos_token_id=0, eos_token_id=0, pad_token_id=0)
NATIVE_MOE = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=16,
                      shared_expert_intermediate_size=24, mlp_only_layers=[1], decoder_sparse_step=1),
    "qwen3_moe": dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=16, head_dim=8,
                      decoder_sparse_step=2),
    "deepseek_v2": dict(n_routed_experts=6, n_shared_experts=2, num_experts_per_tok=2, moe_intermediate_size=16,
                        first_k_dense_replace=1, q_lora_rank=12, kv_lora_rank=8, qk_nope_head_dim=8,
                        qk_rope_head_dim=4, v_head_dim=8),
    "deepseek_v3": dict(n_routed_experts=6, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=16,
                        first_k_dense_replace=2, q_lora_rank=None, kv_lora_rank=8, qk_nope_head_dim=8,
                        qk_rope_head_dim=4, v_head_dim=8, n_group=1, topk_group=1),
}


@pytest.mark.parametrize("family", sorted(NATIVE_MOE))
def test_native_moe_matches_transformers(family):
    """Every parameter and saved buffer of transformers' own model, built on the meta device."""
    config = AutoConfig.for_model(family, **(MOE_SMALL | NATIVE_MOE[family]))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    saved = model.state_dict()
    real = sum(p.numel() for p in model.parameters()) + sum(
        b.numel() for name, b in model.named_buffers() if name in saved)
    found = describe(config.to_dict())
    assert found.total == real
    assert found.kind is Kind.NATIVE and found.moe_layers


CONVERSIONS = [
    ("llama", Spec(experts=4, topk=2)),  # native mixtral
    ("llama", Spec(experts=4, topk=1, granularity=2, shared_experts=1)),  # native qwen2_moe, shared gate
    ("mistral", Spec(experts=3, topk=1, moe_layers="every:2")),
    ("qwen3", Spec(experts=4, topk=2, moe_layers="skip-first:1")),
    ("llama", Spec(experts=4, topk=2, granularity=4, format=Format.REMOTE)),
    ("gpt2", Spec(experts=4, topk=2, granularity=2, shared_experts=1)),  # biases, not gated: remote
    ("granite", Spec(experts=2, topk=1)),  # mlp_bias: gated with biases
]


@pytest.mark.parametrize("family,spec", CONVERSIONS, ids=[f"{f}-{i}" for i, (f, _) in enumerate(CONVERSIONS)])
def test_prediction_equals_what_conversion_writes(family, spec, tmp_path):
    source = make_tiny(family, tmp_path / "src")
    config = json.loads((source / "config.json").read_text())
    plan = upcycled(config, spec)
    result = convert(source, tmp_path / "out", spec, source=str(source))
    assert plan.target == result.target
    assert plan.result.total == result.total_params == stored_params(tmp_path / "out")
    assert plan.result.active == result.active_params
    assert plan.disk == result.total_bytes
    # Inspecting the output (native or remote) reads the same numbers back from its config.json.
    written = describe(json.loads((tmp_path / "out" / "config.json").read_text()))
    assert (written.total, written.active) == (result.total_params, result.active_params)
    assert written.moe_layers == result.moe_layers




def write_config(folder: Path, config: dict) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_cli_json_report(tmp_path, capsys):
    folder = write_config(tmp_path / "mistral", MISTRAL_7B)
    assert run_cli("inspect", folder, "--experts", 8, "--topk", 2, "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["architecture"] == "mistral" and report["kind"] == "dense" and report["num_layers"] == 32
    assert 0.77 < report["ffn_share"] < 0.79
    assert report["size_bytes"]["bfloat16"] == 2 * report["total_params"]
    assert report["safetensors_bytes"] is None  # a config alone
    conversion = report["conversion"]
    assert round(conversion["total_params"] / 1e9, 1) == 46.7 and round(conversion["active_params"] / 1e9, 1) == 12.9
    assert conversion["target"] == "mixtral" and conversion["disk_bytes"] == conversion["size_bytes"]["bfloat16"]
    assert conversion["layers"][0]["experts"] == 8 and conversion["layers"][0]["topk"] == 2


def test_cli_table_on_a_real_folder(tiny_llama, capsys):
    assert run_cli("inspect", tiny_llama, "--granularity", 2, "--moe-layers", "0,2") == 0
    out = capsys.readouterr().out  # the report is a result: stdout
    assert "layers 0, 2" in out and "16 experts of width 48, top-4" in out and "layer 1" in out
    assert run_cli("inspect", tiny_llama, "--shared-experts", 2) == 0
    assert "8 experts of width 96, top-2, 2 shared of width 96" in capsys.readouterr().out
    assert "of safetensors here" in out and "conversion needs" in out


def test_hub_id_downloads_config_only(tmp_path, monkeypatch, capsys):
    config = write_config(tmp_path / "cached", DEEPSEEKMOE_16B) / "config.json"
    asked = []
    monkeypatch.setattr(hub, "hf_hub_download", lambda repo, name: asked.append((repo, name)) or str(config))
    assert run_cli("inspect", "deepseek-ai/deepseek-moe-16b-base", "--json") == 0
    assert asked == [("deepseek-ai/deepseek-moe-16b-base", "config.json")]
    report = json.loads(capsys.readouterr().out)
    assert round(report["total_params"] / 1e9, 1) == 16.4 and round(report["active_params"] / 1e9, 1) == 2.8


def test_offline_hub_id_is_one_clear_line(monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert run_cli("inspect", "someone/not-cached-anywhere") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot fetch config.json of someone/not-cached-anywhere") and "\n" not in err


@pytest.mark.parametrize("config,options,message", [
    (QWEN15_MOE_A27B, ("--experts", 4), "apply to dense sources"),
    (MISTRAL_7B, ("--granularity", 5), "does not divide the intermediate size 14336"),
    (MISTRAL_7B, ("--topk", 9), "--topk must be between 1 and --experts"),
    (dict(model_type="bert", hidden_size=8), (), "cannot inspect architecture 'bert'"),
    (dict(model_type="deepseek", num_hidden_layers=2), (), "config.json of this deepseek model lacks hidden_size"),
])
def test_refusals(tmp_path, capsys, config, options, message):
    folder = write_config(tmp_path / "model", config)
    assert run_cli("inspect", folder, *options) == 2
    assert message in capsys.readouterr().err


def test_remote_config_anatomy_without_weights():
    """A moeify remote config.json read alone: shared experts and an output bias count too."""
    base = TINY["llama"] | {"model_type": "llama"}
    config = {"model_type": "moeify", "base_config": base,
              "moe": {"moe_layers": [1, 2], "num_experts": 6, "num_experts_per_tok": 2, "expert_intermediate_size": 24,
                      "num_shared_experts": 2, "shared_intermediate_size": 12, "gated": True, "bias": False,
                      "output_bias": True}}
    dense = describe(base)
    found = describe(config)
    H = 64
    moe_ffn = 6 * 3 * H * 24 + 2 * 3 * H * 12 + H + 6 * H
    assert found.kind is Kind.REMOTE
    assert found.total == dense.total - 2 * 3 * H * 96 + 2 * moe_ffn
    assert found.active == found.total - 2 * (6 - 2) * 3 * H * 24
    assert anatomy.describe(config).moe_layers == [1, 2]


def test_conversion_needs_follow_dtype_not_expert_count():
    small, large = upcycled(MISTRAL_7B, Spec(experts=8, topk=2)), upcycled(MISTRAL_7B, Spec(experts=64, topk=2))
    assert small.peak_memory == large.peak_memory  # streaming: one layer at a time, whatever the count
    assert large.disk > 7 * small.disk
    fp32 = upcycled(MISTRAL_7B, Spec(experts=8, topk=2, dtype="float32"))
    assert fp32.dtype == "float32" and fp32.disk == 2 * small.disk and fp32.peak_memory > small.peak_memory
    unstated = upcycled({k: v for k, v in MISTRAL_7B.items() if k != "torch_dtype"}, Spec())
    assert unstated.dtype == "float32"  # config.json does not say: assume the larger size


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # gated without biases; ungated with biases
def test_peer_output_counts_every_stored_tensor_and_the_retrieved_neurons(family, tmp_path, capsys):
    """A PEER checkpoint: total is every stored parameter; a token uses its shared neurons, the
    heads x top-k it retrieves, and every query and sub-key; the other neuron slots are inactive."""
    from tests.test_split import CALIBRATION, add_char_tokenizer

    source = add_char_tokenizer(make_tiny(family, tmp_path / family))
    out = tmp_path / "peer"
    assert run_cli("peer", source, "--heads", "2", "--topk", "4", "--shared-neurons", "2", "--query-norm",
                   "--calibration", CALIBRATION, "--calibration-tokens", "512", "--output", out) == 0
    capsys.readouterr()
    assert run_cli("inspect", out, "--json") == 0
    report = json.loads(capsys.readouterr().out)
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert report["total_params"] == sum(p.numel() for p in model.parameters())
    blocks = [m for m in model.modules() if type(m).__name__ == "PeerBlock"]
    neurons = blocks[0].peer["num_neurons"]
    inactive = 0
    for block in blocks:
        slot = sum(t.shape[1] if t.dim() == 2 else 1 for t in
                   (block.gate_rows, block.up_rows, block.down_rows, block.gate_bias, block.up_bias) if t is not None)
        inactive += (block.n ** 2 - 8) * slot
    assert report["active_params"] == report["total_params"] - inactive
    [group] = report["layers"]
    assert {k: group[k] for k in ("peer", "neurons", "heads", "active_neurons", "shared_neurons", "neuron_share")} == {
        "peer": True, "neurons": neurons, "heads": 2, "active_neurons": 8, "shared_neurons": 2,
        "neuron_share": round(10 / (neurons + 2), 4)}
    assert run_cli("inspect", out) == 0
    assert f"PEER: {neurons} neurons" in capsys.readouterr().out
