"""Layer by layer equals whole model: logits of every family, calibration statistics, split outputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moeify import calibration
from moeify.adapters import adapter_for
from moeify.checkpoint import Checkpoint
from moeify.errors import MoeifyError
from moeify.layerwise import LayerwiseModel
from moeify.loading import Code, load_model, tokenizer_in
from tests.fixtures import TINY, logits, make_tiny, run_cli
from tests.test_split import add_char_tokenizer

TOKENS = torch.randint(3, 200, (3, 40), generator=torch.Generator().manual_seed(1))
MOE = {  # tiny native MoE families, beside the dense ones of tests/fixtures.py
    "mixtral": dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=211, num_local_experts=4, num_experts_per_tok=2,
                    max_position_embeddings=128),
    "qwen2_moe": dict(hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                      shared_expert_intermediate_size=24, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=211, num_experts=4, num_experts_per_tok=2,
                      decoder_sparse_step=2, max_position_embeddings=128),
    "qwen3_moe": dict(hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=211, num_experts=4,
                      num_experts_per_tok=2, max_position_embeddings=128),
}


def layerwise_logits(folder: Path, batches: list[torch.Tensor]) -> torch.Tensor:
    runner = LayerwiseModel(folder)
    states = runner.start(batches)
    runner.run(states)
    with runner.head() as head:
        return torch.cat([head(state) for state in states])


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "phi3", "gpt2", *MOE])
def test_logits_equal_the_whole_model(family, tmp_path, monkeypatch):
    monkeypatch.setitem(TINY, family, TINY.get(family) or MOE[family])
    folder = make_tiny(family, tmp_path / family, dtype=torch.bfloat16)  # read as float32, like load_model
    got = layerwise_logits(folder, list(TOKENS.split(2)))  # batches of 2 and 1
    assert (got - logits(folder, TOKENS)).abs().max() < 1e-5


def test_a_missing_layer_weight_is_one_error_line(tmp_path):
    folder = make_tiny("llama", tmp_path / "llama")
    weights = load_file(folder / "model.safetensors")
    del weights["model.layers.1.mlp.down_proj.weight"]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    runner = LayerwiseModel(folder)
    states = runner.start([TOKENS])
    with pytest.raises(MoeifyError, match=r"lacks 1 weight\(s\) its config needs \(e.g. model.layers.1.mlp.down_proj"):
        runner.run(states)


# ---------------------------------------------------------------------------- calibration statistics


def whole_model_statistics(folder: Path, layers: list[int], text: str, budget: int) -> dict:
    """The reference: the dense model whole in memory, hooks on every chosen FFN."""
    from transformers.activations import ACT2FN

    ckpt = Checkpoint(folder)
    adapter = adapter_for(ckpt.config)
    act = ACT2FN[adapter.activation(ckpt.config)]
    model = load_model(folder, Code.FAMILY)
    batches = calibration.calibration_batches(tokenizer_in(folder), text, budget, lambda line: None,
                                              calibration.sequence_length(ckpt.config))
    stats, handles = {}, []
    for i in layers:
        ffn = adapter.read_ffn(ckpt, i).map(lambda role, t: t.float())
        stats[i] = calibration.LayerStats(int(ckpt.config[adapter.hidden_field]), ffn.intermediate_size, True)

        def record(module, args, i=i, ffn=ffn):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            stats[i].update(x, calibration.contributions(ffn, act, x))

        handles.append(model.get_submodule(adapter.mlp_path(i)).register_forward_pre_hook(record))
    with torch.no_grad():
        for batch in batches:
            model(batch)
    return stats


@pytest.mark.parametrize("family", ["llama", "gpt2", "phi3"])
def test_statistics_equal_the_whole_model(family, tmp_path):
    folder = add_char_tokenizer(make_tiny(family, tmp_path / family))
    text = tmp_path / "notes.txt"
    text.write_text(" ".join(calibration.builtin_texts(600)))
    layers = [0, 1]
    expected = whole_model_statistics(folder, layers, str(text), 600)
    got = calibration.collect(folder, adapter_for(Checkpoint(folder).config), layers, str(text), 600, 0,
                              coactivation=True)  # gpt2's context is 64: sequences of 64
    for i in layers:
        assert got[i].tokens == expected[i].tokens == 600
        for name in ("mass", "hot", "xx", "xs", "cc"):
            a, b = getattr(got[i], name).double(), getattr(expected[i], name).double()
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6 * b.abs().max()), (i, name)


def test_split_outputs_are_the_same_from_both_paths(tmp_path, monkeypatch):
    llama = add_char_tokenizer(make_tiny("llama", tmp_path / "llama"))
    text = tmp_path / "notes.txt"
    text.write_text(" ".join(calibration.builtin_texts(800)))
    options = ("--granularity", 4, "--topk", 2, "--calibration", text, "--calibration-tokens", 800)
    assert run_cli("split", llama, "--output", tmp_path / "layerwise", *options) == 0

    def whole(folder, adapter, layers, text_, budget, seed, coactivation, keep_inputs=False, on_progress=None,
              notify=None, reduce=lambda layer, stats: stats):
        stats = whole_model_statistics(folder, layers, text_, budget)
        return {i: reduce(i, stats[i]) for i in layers}

    monkeypatch.setattr(calibration, "collect", whole)
    assert run_cli("split", llama, "--output", tmp_path / "whole", *options) == 0
    a, b = (load_file(tmp_path / name / "model.safetensors") for name in ("layerwise", "whole"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_first_phase_reads_no_untied_head(tmp_path, monkeypatch):
    folder = make_tiny("mistral", tmp_path / "mistral")  # untied: lm_head is a tensor of its own
    read = []
    original = Checkpoint.read
    monkeypatch.setattr(Checkpoint, "read", lambda self, name: (read.append(name), original(self, name))[1])
    runner = LayerwiseModel(folder)
    states = runner.start([TOKENS])
    assert "lm_head.weight" not in read and "model.embed_tokens.weight" in read
    assert all(p.is_meta for p in runner.model.parameters())  # embeddings dropped again
    runner.run(states)
    with runner.head() as head:
        assert "lm_head.weight" in read and head(states[0]).shape == (3, 40, 211)
