"""`moeify upcycle` end to end on tiny random Llama and Mistral models: the output is a native
Mixtral checkpoint that computes exactly what the source did, and symmetry breaking touches
experts only."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from transformers import AutoModelForCausalLM, MixtralForCausalLM

from moeify.spec import Spec
from tests.fixtures import TINY, make_tiny, run_cli

LAYERS, I, VOCAB = 3, 96, 211
SIDE_FILES = {
    "tokenizer_config.json": json.dumps({"model_max_length": 256, "chat_template": "{{ messages }}"}),
    "tokenizer.json": json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {}, "merges": []}}),
    "special_tokens_map.json": json.dumps({"bos_token": "<s>"}),
    "chat_template.jinja": "{% for m in messages %}{{ m.content }}{% endfor %}",
    "tokenizer.model": "not really sentencepiece",
    "merges.txt": "#version: 0.2\n",
}
NOT_COPIED = {"pytorch_model.bin": "weights in another format", "modeling_x.py": "code", ".gitattributes": "*"}




def upcycled(source: Path, output: Path, *options: object) -> Path:
    code = run_cli("upcycle", source, "--output", output, *options)
    assert code == 0
    return output


def load(folder: Path, dtype=torch.float32):
    model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, output_loading_info=True)
    return model.eval(), info


def sample_tokens(batch: int = 2, length: int = 24, seed: int = 0) -> torch.Tensor:
    # longer than mistral's sliding window (8), so the window is exercised
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def run_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits


def greedy(model, tokens: torch.Tensor, new: int = 12) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(tokens, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                              attention_mask=torch.ones_like(tokens), pad_token_id=0)


def tensors_of(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, framework="pt") as f:
            out |= {k: f.get_tensor(k) for k in f.keys()}
    return out


def raw(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def expert_key(layer: int, j: int, w: str) -> str:
    return f"model.layers.{layer}.block_sparse_moe.experts.{j}.{w}.weight"


def router_key(layer: int) -> str:
    return f"model.layers.{layer}.block_sparse_moe.gate.weight"


def ffn_key(layer: int, proj: str) -> str:
    return f"model.layers.{layer}.mlp.{proj}.weight"


def with_side_files(folder: Path) -> Path:
    for name, text in SIDE_FILES.items() | NOT_COPIED.items():
        (folder / name).write_text(text)
    (folder / "README.md").write_text("---\nlicense: apache-2.0\n---\n# source card\n")
    return folder


# ---------------------------------------------------------------------------- exactness




@pytest.fixture(scope="module", params=["llama", "mistral"])
def pair(request, tmp_path_factory) -> tuple[str, Path, Path]:
    """(family, source, output) for the default 4-expert top-2 upcycle."""
    root = tmp_path_factory.mktemp(request.param)
    source = with_side_files(make_tiny(request.param, root / "source"))
    return request.param, source, upcycled(source, root / "moe", "--experts", 4, "--topk", 2)


def test_output_is_a_native_mixtral_with_no_loading_surprises(pair):
    family, source, output = pair
    model, info = load(output)
    assert isinstance(model, MixtralForCausalLM)
    assert info["missing_keys"] == set() or not info["missing_keys"]
    assert not info["unexpected_keys"] and not info["mismatched_keys"] and not info.get("error_msgs")
    assert model.config.num_local_experts == 4 and model.config.num_experts_per_tok == 2
    assert model.config.intermediate_size == I


def test_logits_and_greedy_generation_equal_the_source(pair):
    family, source, output = pair
    dense, _ = load(source)
    moe, _ = load(output)
    tokens = sample_tokens()
    expected, got = run_logits(dense, tokens), run_logits(moe, tokens)
    assert got.shape == expected.shape == (2, 24, VOCAB)
    assert (got - expected).abs().max().item() < 1e-4
    assert expected.std() > 0.05  # random weights large enough that a wrong model would show
    assert torch.equal(greedy(moe, tokens[:, :6]), greedy(dense, tokens[:, :6]))


def test_config_carries_every_backbone_field(pair):
    family, source, output = pair
    src = json.loads((source / "config.json").read_text())
    out = json.loads((output / "config.json").read_text())
    assert out["model_type"] == "mixtral" and out["architectures"] == ["MixtralForCausalLM"]
    for key in ("rms_norm_eps", "head_dim", "tie_word_embeddings", "vocab_size", "hidden_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "max_position_embeddings", "bos_token_id",
                "eos_token_id", "hidden_act", "rope_parameters"):
        assert out[key] == src[key], key
    # The values the fixtures chose on purpose differ from Mixtral's defaults.
    tiny = TINY[family]
    assert out["rms_norm_eps"] == tiny["rms_norm_eps"] and out["head_dim"] == tiny["head_dim"]
    assert out["rope_parameters"]["rope_theta"] == tiny["rope_theta"]
    assert out["tie_word_embeddings"] is tiny["tie_word_embeddings"]
    assert out.get("pad_token_id") == src.get("pad_token_id")
    if family == "mistral":
        assert out["sliding_window"] == 8
    else:
        assert out.get("sliding_window") is None
    assert out["num_local_experts"] == 4 and out["num_experts_per_tok"] == 2 and out["intermediate_size"] == I
    assert out["dtype"] == "float32"


def test_tensor_names_use_the_per_expert_mixtral_layout(pair):
    family, source, output = pair
    src, out = tensors_of(source), tensors_of(output)
    moe_names = {router_key(i) for i in range(LAYERS)}
    moe_names |= {expert_key(i, j, w) for i in range(LAYERS) for j in range(4) for w in ("w1", "w2", "w3")}
    kept = {name for name in src if ".mlp." not in name}
    assert set(out) == kept | moe_names
    assert ("lm_head.weight" in out) is (not TINY[family]["tie_word_embeddings"])
    for i in range(LAYERS):
        assert out[router_key(i)].shape == (4, 64)
        for j in range(4):
            assert torch.equal(out[expert_key(i, j, "w1")], src[ffn_key(i, "gate_proj")])
            assert torch.equal(out[expert_key(i, j, "w2")], src[ffn_key(i, "down_proj")])
            assert torch.equal(out[expert_key(i, j, "w3")], src[ffn_key(i, "up_proj")])


def test_side_files_card_and_record(pair):
    family, source, output = pair
    for name, text in SIDE_FILES.items():
        assert (output / name).read_text() == text, name
    assert (output / "generation_config.json").read_bytes() == (source / "generation_config.json").read_bytes()
    for name in NOT_COPIED:
        assert not (output / name).exists(), name
    # The card: front matter with the tags a Hub page needs, and what was done.
    card = (output / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert "moe" in front["tags"] and "mixtral" in front["tags"]
    assert front["library_name"] == "transformers" and front["license"] == "apache-2.0"
    assert "base_model" not in front  # a local folder names no Hub repo
    assert "source card" not in card
    record = json.loads((output / "moeify.json").read_text())
    total = sum(t.numel() for t in tensors_of(output).values())
    per_expert = 3 * 64 * I
    assert record["total_params"] == total
    assert record["active_params"] == total - LAYERS * (4 - 2) * per_expert
    assert record["target"] == "mixtral" and record["source"] == source.name  # a folder's name, never its path
    assert record["moe_layer_indices"] == [0, 1, 2]
    # moeify.json replays the conversion: its spec keys make the same Spec.
    spec_keys = {f.name for f in dataclasses.fields(Spec)}
    assert Spec.from_dict({k: v for k, v in record.items() if k in spec_keys}) == Spec(experts=4, topk=2)
    assert f"{total / 1e3:.3g}K" in card  # total parameters, as the summary prints them


def test_source_without_side_files(tmp_path: Path):
    source = make_tiny("llama", tmp_path / "bare")
    (source / "generation_config.json").unlink()
    output = upcycled(source, tmp_path / "new" / "parents" / "moe", "--experts", 2, "--topk", 1)
    assert sorted(p.name for p in output.iterdir()) == ["README.md", "config.json", "model.safetensors", "moeify.json"]
    model, info = load(output)
    assert not info["missing_keys"] and not info["unexpected_keys"]


@pytest.mark.parametrize("source_dtype, option, expected", [
    (torch.float32, "bfloat16", torch.bfloat16),
    (torch.float32, "float16", torch.float16),
    (torch.bfloat16, "auto", torch.bfloat16),
    (torch.bfloat16, "float32", torch.float32),
])
def test_output_dtype(tmp_path: Path, source_dtype: torch.dtype, option: str, expected: torch.dtype):
    source = make_tiny("llama", tmp_path / "source", dtype=source_dtype)
    output = upcycled(source, tmp_path / "moe", "--experts", 4, "--topk", 2, "--dtype", option)
    out = tensors_of(output)
    assert {t.dtype for t in out.values()} == {expected}
    assert json.loads((output / "config.json").read_text())["dtype"] == str(expected).removeprefix("torch.")
    size = sum(t.numel() for t in out.values()) * expected.itemsize
    assert size <= (output / "model.safetensors").stat().st_size < size + 100_000
    # Exactly the source rounded to the output dtype: compare in float32 against the rounded dense model.
    dense = AutoModelForCausalLM.from_pretrained(source, dtype=expected).float().eval()
    moe, info = load(output)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    tokens = sample_tokens()
    assert (run_logits(moe, tokens) - run_logits(dense, tokens)).abs().max().item() < 1e-4


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_granularity_two_is_exact(tmp_path: Path, family: str):
    source = make_tiny(family, tmp_path / "source")
    output = upcycled(source, tmp_path / "moe", "--experts", 2, "--topk", 1, "--granularity", 2)
    moe, info = load(output)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert moe.config.num_local_experts == 4 and moe.config.num_experts_per_tok == 2
    assert moe.config.intermediate_size == I // 2
    dense, _ = load(source)
    tokens = sample_tokens()
    assert (run_logits(moe, tokens) - run_logits(dense, tokens)).abs().max().item() < 1e-4
    assert torch.equal(greedy(moe, tokens[:, :6]), greedy(dense, tokens[:, :6]))


def test_sharded_source_and_sharded_output(tmp_path: Path):
    tiny = make_tiny("mistral", tmp_path / "tiny")
    source = tmp_path / "sharded-source"
    AutoModelForCausalLM.from_pretrained(tiny).save_pretrained(source, max_shard_size="100KB")
    assert (source / "model.safetensors.index.json").is_file() and len(list(source.glob("*.safetensors"))) > 2
    output = upcycled(source, tmp_path / "moe", "--experts", 4, "--topk", 1, "--max-shard-size", "300KB")
    shards = sorted(output.glob("*.safetensors"))
    assert len(shards) > 2 and all(s.stat().st_size < 300_000 + 10_000 for s in shards)
    index = json.loads((output / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors_of(output))
    moe, info = load(output)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    dense, _ = load(tiny)
    tokens = sample_tokens()
    assert (run_logits(moe, tokens) - run_logits(dense, tokens)).abs().max().item() < 1e-4


@pytest.mark.parametrize("rope_scaling", [
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 32},
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
])
def test_rope_scaling_is_carried_over(tmp_path: Path, rope_scaling: dict):
    source = make_tiny("llama", tmp_path / "source", rope_scaling=rope_scaling)
    src = json.loads((source / "config.json").read_text())
    assert src["rope_parameters"]["rope_type"] == rope_scaling["rope_type"]
    output = upcycled(source, tmp_path / "moe", "--experts", 2, "--topk", 1)
    out = json.loads((output / "config.json").read_text())
    assert out["rope_parameters"] == src["rope_parameters"]
    dense, _ = load(source)
    moe, _ = load(output)
    tokens = sample_tokens(length=80)  # past the original context, where scaling matters most
    assert (run_logits(moe, tokens) - run_logits(dense, tokens)).abs().max().item() < 1e-4


def test_router_init_zeros_is_exact(tmp_path: Path):
    source = make_tiny("llama", tmp_path / "source")
    output = upcycled(source, tmp_path / "moe", "--experts", 4, "--topk", 2, "--router-init", "zeros")
    assert all(not t.any() for name, t in tensors_of(output).items() if name.endswith("block_sparse_moe.gate.weight"))
    dense, _ = load(source)
    moe, _ = load(output)
    tokens = sample_tokens()
    assert (run_logits(moe, tokens) - run_logits(dense, tokens)).abs().max().item() < 1e-4


# ---------------------------------------------------------------------------- symmetry breaking


@pytest.fixture(scope="module")
def noisy(tmp_path_factory) -> dict[str, Path]:
    """One llama source and several conversions of it, all with --seed 5 unless named otherwise."""
    root = tmp_path_factory.mktemp("noise")
    source = make_tiny("llama", root / "source")
    runs = {
        "plain": ("--seed", 5),
        "noise": ("--seed", 5, "--noise", 0.01),
        "drop": ("--seed", 5, "--drop-ratio", 0.3),
        "both": ("--seed", 5, "--noise", 0.01, "--drop-ratio", 0.25),
        "both-again": ("--seed", 5, "--noise", 0.01, "--drop-ratio", 0.25),
        "both-seed6": ("--seed", 6, "--noise", 0.01, "--drop-ratio", 0.25),
    }
    out = {"source": source}
    for name, options in runs.items():
        out[name] = upcycled(source, root / name, "--experts", 4, "--topk", 2, *options)
    return out


@pytest.mark.parametrize("run", ["noise", "drop", "both"])
def test_symmetry_breaking_changes_experts_and_nothing_else(noisy, run):
    src, plain, out = tensors_of(noisy["source"]), tensors_of(noisy["plain"]), tensors_of(noisy[run])
    assert set(out) == set(plain)
    for name, tensor in src.items():
        if ".mlp." not in name:  # every non-expert tensor byte-identical to the source
            assert raw(out[name]) == raw(tensor) and out[name].dtype == tensor.dtype, name
    for layer in range(LAYERS):
        assert torch.equal(out[router_key(layer)], plain[router_key(layer)])  # routers as without noise
        for w, proj in (("w1", "gate_proj"), ("w2", "down_proj"), ("w3", "up_proj")):
            experts = [out[expert_key(layer, j, w)] for j in range(4)]
            for j, expert in enumerate(experts):
                assert not torch.equal(expert, src[ffn_key(layer, proj)]), (layer, j, w)
                assert not torch.equal(expert, plain[expert_key(layer, j, w)])
                for other in experts[j + 1 :]:
                    assert not torch.equal(expert, other)
    # The model still loads, and it is a perturbation of the source, not another model.
    moe, info = load(noisy[run])
    assert not info["missing_keys"] and not info["unexpected_keys"]
    dense, _ = load(noisy["source"])
    tokens = sample_tokens()
    diff = (run_logits(moe, tokens) - run_logits(dense, tokens)).abs().max().item()
    assert 1e-4 < diff < 10


def test_noise_has_the_requested_std(noisy):
    src, out = tensors_of(noisy["source"]), tensors_of(noisy["noise"])
    for layer in range(LAYERS):
        for j in range(4):
            delta = out[expert_key(layer, j, "w3")] - src[ffn_key(layer, "up_proj")]
            assert (delta != 0).float().mean() > 0.99
            assert 0.009 < delta.std().item() < 0.011


def test_drop_ratio_redraws_round_r_times_i_neurons_per_expert(noisy):
    src, out = tensors_of(noisy["source"]), tensors_of(noisy["drop"])
    count = round(0.3 * I)  # 28.8 -> 29
    assert count == 29
    per_layer = []
    for layer in range(LAYERS):
        indices = []
        for j in range(4):
            rows_w1 = (out[expert_key(layer, j, "w1")] != src[ffn_key(layer, "gate_proj")]).any(dim=1)
            rows_w3 = (out[expert_key(layer, j, "w3")] != src[ffn_key(layer, "up_proj")]).any(dim=1)
            cols_w2 = (out[expert_key(layer, j, "w2")] != src[ffn_key(layer, "down_proj")]).any(dim=0)
            assert int(rows_w1.sum()) == count, (layer, j)
            assert torch.equal(rows_w1, rows_w3) and torch.equal(rows_w1, cols_w2), (layer, j)
            # The other neurons are the source's, untouched.
            keep = ~rows_w1
            assert torch.equal(out[expert_key(layer, j, "w1")][keep], src[ffn_key(layer, "gate_proj")][keep])
            assert torch.equal(out[expert_key(layer, j, "w2")][:, keep], src[ffn_key(layer, "down_proj")][:, keep])
            indices.append(tuple(rows_w1.nonzero().flatten().tolist()))
        assert len(set(indices)) == 4  # each expert drops its own neurons
        per_layer.append(indices)
    assert per_layer[0] != per_layer[1]


def test_same_seed_same_output_other_seed_other_output(noisy):
    a, b = noisy["both"], noisy["both-again"]
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "config.json").read_text() == (b / "config.json").read_text()
    first, other = tensors_of(a), tensors_of(noisy["both-seed6"])
    assert not torch.equal(first[expert_key(0, 0, "w1")], other[expert_key(0, 0, "w1")])
    assert not torch.equal(first[router_key(0)], other[router_key(0)])
    record = json.loads((a / "moeify.json").read_text())
    assert (record["seed"], record["noise"], record["drop_ratio"]) == (5, 0.01, 0.25)


def test_shards_hold_the_layers_in_the_order_they_run(tmp_path: Path):
    """Layer 10 after layer 9, not after layer 1 as the source's header sorts them."""
    source = make_tiny("llama", tmp_path / "deep", num_hidden_layers=12)
    out = upcycled(source, tmp_path / "out", "--experts", "2")
    with open(out / "model.safetensors", "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    by_offset = sorted((info["data_offsets"][0], name) for name, info in header.items() if name != "__metadata__")
    layers = [int(name.split(".")[2]) for _, name in by_offset if name.startswith("model.layers.")]
    assert layers == sorted(layers) and layers[-1] == 11
