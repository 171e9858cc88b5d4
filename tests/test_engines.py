"""Which engines compute an output exactly (moeify.engines), the constructions chosen for them, --engine.

The tests marked `engines` run llama.cpp itself on every case of benchmarks/engines.py, checking
each claim the table makes for it (skipped by default: `python -m pytest -m engines`).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig

from moeify import engines, recipe
from moeify.conversion import convert
from moeify.spec import Engine, Spec
from tests.fixtures import logits, make_tiny, run_cli

TOKENS = torch.tensor([[1, 17, 42, 5, 99, 160, 7, 23, 64, 3, 150, 88]])
BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "engines.py"


def verdict(config, engine: Engine, spec: Spec = Spec()) -> engines.Verdict:
    found = engines.verdicts(config.to_dict() if hasattr(config, "to_dict") else config, spec)
    return next(v for v in found if v.engine is engine)


# ---------------------------------------------------------------------------- the table


def qwen2_moe(**fields) -> Qwen2MoeConfig:
    """A Qwen2-MoE config every engine runs (what --engine any writes), with changes."""
    return Qwen2MoeConfig(**{"num_experts": 4, "num_experts_per_tok": 2, "norm_topk_prob": False,
                             "tie_word_embeddings": False, "shared_expert_intermediate_size": 8, **fields})


@pytest.mark.parametrize("fields,reason", [
    ({"norm_topk_prob": True}, "never renormalises top-k weights"),
    ({"mlp_only_layers": [0]}, "has no dense layers"),
    ({"decoder_sparse_step": 2}, "has no dense layers"),
    ({"tie_word_embeddings": True}, "needs an lm_head.weight"),
    ({"shared_expert_intermediate_size": 0}, "needs a shared expert in every layer"),
    ({"hidden_size": 64, "num_attention_heads": 4, "head_dim": 24}, "head_dim = hidden_size / heads = 16, not 24"),
    ({"use_sliding_window": True, "sliding_window": 8, "layer_types": ["sliding_attention"] * 24},
     "ignores the 8-token sliding window"),
])
def test_llamacpp_qwen2moe_lacks(fields, reason):
    assert verdict(qwen2_moe(), Engine.LLAMACPP).exact
    found = verdict(qwen2_moe(**fields), Engine.LLAMACPP)
    assert not found.exact and found.reason.startswith("qwen2_moe: ") and reason in found.reason
    assert verdict(qwen2_moe(**fields), Engine.TRANSFORMERS).exact  # the reference computes every config


def test_vllm_qwen2_moe_always_has_qkv_biases_and_derives_head_dim():
    assert verdict(qwen2_moe(mlp_only_layers=[0], norm_topk_prob=True), Engine.VLLM).exact
    assert "always has q/k/v biases" in verdict(qwen2_moe(qkv_bias=False), Engine.VLLM).reason
    assert "not 24" in verdict(qwen2_moe(hidden_size=64, num_attention_heads=4, head_dim=24), Engine.VLLM).reason


def test_renormalisation_matters_only_below_every_expert():
    assert not verdict(qwen2_moe(norm_topk_prob=True), Engine.LLAMACPP).exact
    assert verdict(qwen2_moe(norm_topk_prob=True, num_experts_per_tok=4), Engine.LLAMACPP).exact
    qwen3 = Qwen3MoeConfig(num_experts=4, num_experts_per_tok=2, norm_topk_prob=False)
    assert "always renormalises" in verdict(qwen3, Engine.LLAMACPP).reason  # qwen3moe.cpp: norm_w = true
    assert verdict(qwen3, Engine.VLLM).exact


def test_llama3_rope_scaling_is_lost_in_llamacpp_qwen_moe_only():
    """llama.cpp writes Llama 3's rope frequency factors for its llama architecture; qwen2moe.cpp applies none."""
    rope = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}
    assert "ignores llama3 rope scaling" in verdict(qwen2_moe(rope_parameters=rope), Engine.LLAMACPP).reason
    assert verdict(qwen2_moe(rope_parameters=rope), Engine.VLLM).exact
    assert verdict(MixtralConfig(num_local_experts=4, rope_parameters=rope), Engine.LLAMACPP).exact


def test_mistral_sliding_window_is_ignored_by_both_mixtral_engines():
    windowed = MixtralConfig(num_local_experts=4, sliding_window=4096)
    assert verdict(MixtralConfig(num_local_experts=4), Engine.LLAMACPP).exact
    for engine in (Engine.LLAMACPP, Engine.VLLM):
        assert "4096-token sliding window" in verdict(windowed, engine).reason


def test_remote_format_runs_in_transformers_only():
    found = engines.verdicts({"model_type": "moeify"}, Spec(format="remote"))
    assert [v.exact for v in found] == [True, False, False]
    no_code = "(remote format: no implementation of its code; would with a native format (drop --format remote))"
    assert engines.line(found) == f"transformers ✓, vLLM ✗ {no_code}, llama.cpp ✗ {no_code}"


# ---------------------------------------------------------------------------- constructions


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> tuple[Path, torch.Tensor]:
    """The tiny Llama (tied embeddings) with head_dim 64 / 4 heads (what Qwen2-MoE engines assume), its logits."""
    folder = make_tiny("llama", tmp_path_factory.mktemp("llama") / "llama", head_dim=16)
    return folder, logits(folder, TOKENS)


@pytest.mark.parametrize("engine", list(Engine))
def test_every_engine_construction_is_exact_in_transformers(llama, tmp_path, engine):
    source, dense = llama
    spec = Spec(experts=4, topk=2, shared_experts=1, router_init="zeros", engine=engine)
    result = convert(source, tmp_path / "out", spec, source="llama")
    assert result.target == "qwen2_moe"
    assert (logits(tmp_path / "out", TOKENS) - dense).abs().max() < 1e-4


def test_for_every_engine_qwen2_moe_gets_what_llamacpp_and_vllm_need(llama, tmp_path):
    source, _ = llama
    convert(source, tmp_path / "out", Spec(experts=4, topk=2, shared_experts=1, router_init="zeros"), source="llama")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    tensors, dense = load_file(tmp_path / "out" / "model.safetensors"), load_file(source / "model.safetensors")
    # llama.cpp: an explicit output projection, a non-zero gate logit, no renormalisation (uniform routing).
    assert config["tie_word_embeddings"] is False
    assert torch.equal(tensors["lm_head.weight"], dense["model.embed_tokens.weight"])
    assert (tensors["model.layers.0.mlp.shared_expert_gate.weight"] == 2.0**-60).all()
    assert config["norm_topk_prob"] is False and not tensors["model.layers.0.mlp.gate.weight"].any()
    # Routed copies carry 1/(S+1) of the FFN each (S = 1 shared), times E/k = 2 for the k/E routing weight.
    assert torch.equal(tensors["model.layers.0.mlp.experts.3.down_proj.weight"],
                       dense["model.layers.0.mlp.down_proj.weight"] * 0.5 * 2)
    # vLLM: q/k/v biases (zeros) in every layer.
    assert config["qkv_bias"] is True and not tensors["model.layers.2.self_attn.v_proj.bias"].any()
    recorded = json.loads((tmp_path / "out" / "moeify.json").read_text())["engines"]
    assert recorded == {"transformers": {"exact": True}, "vllm": {"exact": True}, "llamacpp": {"exact": True}}


def test_an_engine_that_assumes_head_dim_is_refused(tmp_path, capsys):
    source = make_tiny("llama", tmp_path / "llama")  # head_dim 24, not 64 / 4
    capsys.readouterr()
    assert run_cli("upcycle", source, "-o", tmp_path / "out", "--experts", 4, "--shared-experts", 1,
                   "--router-init", "zeros", "--engine", "vllm") == 2
    assert ("vLLM would not compute this output exactly (qwen2_moe: assumes head_dim = hidden_size / heads = 16, "
            "not 24); --engine any writes it anyway") in capsys.readouterr().err
    assert run_cli("upcycle", source, "-o", tmp_path / "out", "--experts", 4, "--engine", "vllm") == 0  # Mixtral


@pytest.mark.parametrize("dtype,entry", [("bfloat16", 2.0**-60), ("float16", 2.0**-24)])
def test_the_gate_row_is_non_zero_in_every_dtype(llama, tmp_path, dtype, entry):
    """float16 cannot hold 2^-60 (it would round to 0, NaN in llama.cpp): its smallest subnormal instead."""
    source, _ = llama
    convert(source, tmp_path / "out", Spec(experts=4, topk=2, shared_experts=1, dtype=dtype), source="llama")
    gate = load_file(tmp_path / "out" / "model.safetensors")["model.layers.0.mlp.shared_expert_gate.weight"]
    assert gate.dtype == getattr(torch, dtype) and (gate.float() == entry).all()


def test_transformers_only_keeps_the_plain_construction(llama, tmp_path):
    source, _ = llama
    spec = Spec(experts=4, topk=2, shared_experts=1, router_init="zeros", engine="transformers")
    convert(source, tmp_path / "out", spec, source="llama")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    tensors = load_file(tmp_path / "out" / "model.safetensors")
    assert config["tie_word_embeddings"] is True and "lm_head.weight" not in tensors
    assert config["norm_topk_prob"] is True and config["qkv_bias"] is False
    assert not tensors["model.layers.0.mlp.shared_expert_gate.weight"].any()


def test_a_random_router_keeps_renormalisation_and_says_llamacpp_would_not(llama, tmp_path):
    source, _ = llama
    result = convert(source, tmp_path / "out", Spec(experts=4, topk=2, shared_experts=1), source="llama")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["norm_topk_prob"] is True
    cpp = next(v for v in result.engines if v.engine is Engine.LLAMACPP)
    assert not cpp.exact and "never renormalises" in cpp.reason and cpp.remedy == "--router-init zeros"


# ---------------------------------------------------------------------------- command line


@pytest.mark.parametrize("args,says", [
    (["--moe-layers", "skip-first:1", "--router-init", "zeros"], "has no dense layers (mlp_only_layers)); it would "
                                                                 "with --moe-layers all"),
    (["--shared-experts", "1"], "never renormalises top-k weights (ignores norm_topk_prob)); it would with "
                                "--router-init zeros"),
    (["--format", "remote"], "remote format: no implementation of its code"),
])
def test_engine_llamacpp_refuses_in_one_line_before_writing(llama, tmp_path, capsys, args, says):
    source, _ = llama
    capsys.readouterr()
    assert run_cli("upcycle", source, "-o", tmp_path / "out", "--experts", 4, *args, "--engine", "llamacpp") == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and says in lines[0]
    assert lines[0].startswith("error: --engine llamacpp: llama.cpp would not compute this output exactly (")
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == []


def test_engine_llamacpp_writes_and_records_what_llamacpp_runs(llama, tmp_path, capsys):
    source, _ = llama
    out = tmp_path / "out"
    assert run_cli("upcycle", source, "-o", out, "--experts", 4, "--shared-experts", 1, "--router-init", "zeros",
                   "--engine", "llamacpp") == 0
    summary = capsys.readouterr().out  # results go to stdout
    assert "engines" in summary and "llama.cpp ✓" in summary
    record = json.loads((out / "moeify.json").read_text())
    assert record["engine"] == "llamacpp" and record["engines"]["llamacpp"] == {"exact": True}
    # Built for llama.cpp (and transformers) only: vLLM's q/k/v biases are written for --engine any or vllm.
    assert ("| runs exactly in | transformers ✓, vLLM ✗ (qwen2_moe: always has q/k/v biases, which this checkpoint "
            "lacks), llama.cpp ✓ |") in (out / "README.md").read_text()
    assert recipe.load(out / "moeify.json").engine is Engine.LLAMACPP  # the record replays as a recipe


def test_split_engine_llamacpp(tmp_path, capsys):
    """A MoE source splits into its own format (llama.cpp runs a Qwen3-MoE); a dense split is remote."""
    dense = make_tiny("qwen3", tmp_path / "qwen3")
    convert(dense, tmp_path / "moe", Spec(experts=4, topk=2, router_std=0.5), source="qwen3")
    assert run_cli("split", tmp_path / "moe", "-o", tmp_path / "split", "--granularity", 2,
                   "--engine", "llamacpp") == 0
    assert json.loads((tmp_path / "split" / "moeify.json").read_text())["engines"]["llamacpp"]["exact"]
    capsys.readouterr()
    assert run_cli("split", dense, "-o", tmp_path / "dense-split", "--granularity", 2, "--partition", "contiguous",
                   "--router-init", "centroid", "--engine", "llamacpp") == 2
    assert "remote format: no implementation" in capsys.readouterr().err
    assert not (tmp_path / "dense-split").exists()


# ---------------------------------------------------------------------------- llama.cpp itself


def _benchmark():
    """benchmarks/engines.py as a module (its cases and checks), loaded once."""
    if "engines_benchmark" not in sys.modules:
        spec = importlib.util.spec_from_file_location("engines_benchmark", BENCHMARK)
        sys.modules["engines_benchmark"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["engines_benchmark"])
    return sys.modules["engines_benchmark"]


def _case_names() -> list[str]:
    return [case.name for case in _benchmark().CASES]


@pytest.mark.engines
@pytest.mark.parametrize("name", _case_names())
def test_llamacpp_claim_holds(name, tmp_path):
    """moeify's verdict for llama.cpp matches what llama.cpp computes (converted with its own converter)."""
    bench = _benchmark()
    try:
        bench.require_llama_cpp()
        bench.converter()
    except bench.Missing as e:
        pytest.fail(str(e))  # asked for with -m engines: a missing engine is a failure, with how to install it
    row = bench.check(next(c for c in bench.CASES if c.name == name), tmp_path)
    assert row.exactness < 1e-4, "transformers is exact against the source"
    assert row.holds, f"moeify says {row.claim.line()}; llama.cpp: {row.engine_gap}, greedy same: {row.greedy_same}"
