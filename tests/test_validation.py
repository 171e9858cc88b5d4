"""validation.py: a folder whose config.json and weights disagree is refused in one line, before any write.

Through the CLI where it is about what the user sees (exit code 2, one `error:` line naming the
field or tensor, the source untouched, nothing written beside it), and the validator itself on
every family and MoE source.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moeify import validation
from moeify.adapters import ADAPTERS, adapter_for
from moeify.checkpoint import Checkpoint
from moeify.errors import MoeifyError
from moeify.moe_source import moe_source_for
from moeify.validation import check_config, check_weights
from tests.fixtures import TINY, make_tiny, run_cli
from tests.test_cli_errors import assert_one_line_error, snapshot
from tests.test_split_moe_sources import make_qwen_moe

pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")


@pytest.fixture(autouse=True)
def fresh_cache(tmp_path_factory, monkeypatch) -> Path:
    """moeify's cache in a folder of its own: no verdict remembered by another run, nothing written to ~/.cache."""
    cache = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("MOEIFY_CACHE", str(cache))
    return cache


def edit_config(folder: Path, **changes) -> Path:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | changes))
    return folder


def refused(tmp_path: Path, capsys, source: Path, *needles: str, command: tuple = ("upcycle", "--experts", 2)) -> str:
    """Convert source: exit 2, one error line holding needles, the source as it was, nothing new beside it."""
    before, around = snapshot(source), sorted(p.name for p in tmp_path.iterdir())
    capsys.readouterr()  # building the source printed transformers' own progress
    code = run_cli(command[0], source, *command[1:], "--output", tmp_path / "out")
    line = assert_one_line_error(capsys, code, *needles)
    assert snapshot(source) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == around  # no output, no hidden staging, no lock
    return line


# ---------------------------------------------------------------------------- config.json numbers, names, dtypes


@pytest.mark.parametrize("change, needles", [
    ({"num_hidden_layers": 1e9}, ("num_hidden_layers", "from 1 to 1024", "1000000000.0")),
    ({"num_hidden_layers": 10**9}, ("num_hidden_layers", "from 1 to 1024", "1000000000")),
    ({"num_hidden_layers": "3"}, ("num_hidden_layers", "integer", "'3'")),
    ({"num_hidden_layers": True}, ("num_hidden_layers", "integer", "True")),
    ({"hidden_size": 2**40}, ("hidden_size", "131072")),
    ({"vocab_size": -1}, ("vocab_size", "from 1")),
    ({"hidden_size": None}, ("hidden_size", "expected int, got NoneType")),
    ({"intermediate_size": 96.5}, ("intermediate_size", "96.5")),
    ({"model_type": ["llama"]}, ("model_type", "['llama']")),
    ({"dtype": "float8"}, ("dtype", "'float8'", "floating-point")),
    ({"torch_dtype": "nope"}, ("torch_dtype", "'nope'")),
    ({"dtype": "int8"}, ("dtype", "'int8'")),
    ({"rms_norm_eps": "small"}, ("rms_norm_eps",)),  # a field moeify does not bound: transformers' own check
])
def test_bad_config_numbers_are_one_line(tmp_path: Path, tiny_llama: Path, capsys, change: dict, needles):
    refused(tmp_path, capsys, edit_config(tiny_llama, **change), "config.json", *needles)


def test_check_config_bounds_nested_sections_and_layer_lists():
    check_config({"model_type": "llama", "head_dim": None, "num_key_value_heads": None})  # null: transformers decides
    check_config({"model_type": "qwen2_moe", "shared_expert_intermediate_size": 0, "mlp_only_layers": [0, 3]})
    with pytest.raises(MoeifyError, match=r"base_config\.num_hidden_layers must be an integer from 1 to 1024"):
        check_config({"model_type": "moeify", "base_config": {"num_hidden_layers": 5000}, "moe": {}})
    with pytest.raises(MoeifyError, match=r"moe\.num_experts must be an integer from 0 to 16384"):
        check_config({"model_type": "moeify", "base_config": {}, "moe": {"num_experts": 10**9}})
    for layers in ([1.5], list(range(2000)), "0,1", [-1]):
        with pytest.raises(MoeifyError, match="mlp_only_layers must be a list of layer indices from 0 to 1023"):
            check_config({"model_type": "qwen2_moe", "mlp_only_layers": layers})
    with pytest.raises(MoeifyError, match=r"moe\.moe_layers must be a list"):
        check_config({"model_type": "moeify", "moe": {"moe_layers": [10**9]}})


@pytest.mark.parametrize("change, needles", [
    ({"model_type": ["llama"]}, ("model_type", "['llama']")),
    ({"num_hidden_layers": 10**9, "hidden_size": 64}, ("num_hidden_layers", "1024")),
    ({"hidden_size": "wide"}, ("hidden_size", "'wide'")),
])
def test_inspect_refuses_bad_config_numbers(tmp_path: Path, capsys, change, needles):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"} | change))
    code = run_cli("inspect", folder)
    assert_one_line_error(capsys, code, "config.json", *needles)


# ---------------------------------------------------------------------------- config.json against the weights


@pytest.mark.parametrize("change, needles", [
    ({"num_hidden_layers": 5}, ("config.json says num_hidden_layers=5 but the weights hold layers 0..2",)),
    ({"num_hidden_layers": 2}, ("config.json says num_hidden_layers=2 but the weights hold layers 0..2",)),
    ({"hidden_size": 128}, ("model.embed_tokens.weight is (211, 64) in the weights", "(211, 128)", "hidden_size=128")),
    ({"vocab_size": 300}, ("model.embed_tokens.weight", "(300, 64)", "vocab_size=300")),
    ({"intermediate_size": 128}, ("model.layers.0.mlp.gate_proj.weight is (96, 64)", "intermediate_size=128")),
    ({"num_attention_heads": 8}, ("model.layers.0.self_attn.q_proj.weight is (96, 64)", "(192, 64)")),
    ({"num_key_value_heads": 4}, ("model.layers.0.self_attn.k_proj.weight is (48, 64)", "(96, 64)")),
    ({"head_dim": 16}, ("model.layers.0.self_attn.q_proj.weight is (96, 64)", "(64, 64)")),
    ({"tie_word_embeddings": False}, ("lm_head.weight (211, 64)", "missing from the weights")),
    ({"attention_bias": True}, ("model.layers.0.self_attn.q_proj.bias (96,)", "missing from the weights")),
])
def test_config_that_does_not_describe_the_weights(tmp_path: Path, tiny_llama: Path, capsys, change, needles):
    """The tiny llama: 3 layers, hidden 64, FFN 96, 4 heads and 2 KV heads of 24, vocabulary 211, tied embeddings."""
    line = refused(tmp_path, capsys, edit_config(tiny_llama, **change), *needles)
    assert "config.json" in line


def test_a_tensor_missing_outside_the_ffn(tmp_path: Path, tiny_llama: Path, capsys):
    weights = tiny_llama / "model.safetensors"
    tensors = load_file(weights)
    del tensors["model.layers.2.input_layernorm.weight"]  # the conversion never reads it: it would pass through absent
    save_file(tensors, weights, {"format": "pt"})
    refused(tmp_path, capsys, tiny_llama, "model.layers.2.input_layernorm.weight (64,)", "missing from the weights")


def test_an_integer_weight_is_refused(tmp_path: Path, tiny_llama: Path, capsys):
    """Its bytes are the right size, so it would be copied into an expert as int32 values."""
    weights = tiny_llama / "model.safetensors"
    tensors = load_file(weights)
    name = "model.layers.1.mlp.up_proj.weight"
    tensors[name] = tensors[name].view(torch.int32)
    save_file(tensors, weights, {"format": "pt"})
    refused(tmp_path, capsys, tiny_llama, f"{name} as int32", "floating point")


def test_loading_weights_of_other_shapes_is_one_line_without_a_missing_report(tiny_llama: Path):
    """transformers' error points at a report moeify keeps quiet: the line says what is wrong instead."""
    from moeify.loading import load_model

    with pytest.raises(MoeifyError, match="some weights' shapes differ from what its config.json describes") as e:
        load_model(edit_config(tiny_llama, intermediate_size=128))
    assert "report" not in str(e.value)


def test_an_integer_buffer_the_family_drops_passes(tmp_path: Path):
    """Old Pythia checkpoints keep GPT-NeoX's boolean causal mask as attention.bias; transformers drops it."""
    folder = make_tiny("gpt_neox", tmp_path / "pythia")
    tensors = load_file(folder / "model.safetensors")
    for name in [n for n in tensors if n.endswith("attention.query_key_value.weight")]:
        layer = name.removesuffix(".query_key_value.weight")
        tensors[layer + ".bias"] = torch.tril(torch.ones(8, 8, dtype=torch.bool)).view(1, 1, 8, 8)
        tensors[layer + ".masked_bias"] = torch.tensor(-1e9)
    save_file(tensors, folder / "model.safetensors", {"format": "pt"})
    assert run_cli("upcycle", folder, "--experts", 2, "--topk", 1, "--output", tmp_path / "out") == 0


@pytest.mark.parametrize("weights, claimed, needles", [
    ("qwen2", "llama", ("the weights hold model.layers.0.self_attn.k_proj.bias", "llama model", "has not")),
    ("llama", "qwen3", ("model.layers.0.self_attn.q_norm.weight", "qwen3 model", "missing")),
    ("gpt2", "llama", ("llama model, whose layers are model.layers.N", "no such tensor")),
    ("llama", "gemma2", ("model.layers.0.pre_feedforward_layernorm.weight", "gemma2 model", "missing")),
])
def test_another_familys_model_type_is_refused(tmp_path: Path, capsys, weights: str, claimed: str, needles):
    source = make_tiny(weights, tmp_path / "src")
    config = json.loads((source / "config.json").read_text())
    # The family's own field names, so only model_type lies (gpt2 spells them its own way).
    if weights == "gpt2":
        config |= {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 48}
    (source / "config.json").write_text(json.dumps(config | {"model_type": claimed}))
    refused(tmp_path, capsys, source, *needles)


def test_empty_gguf_is_refused_and_nothing_cached(tmp_path: Path, capsys, fresh_cache: Path):
    """A GGUF without tensors loads as a randomly initialised model; it is refused, and nothing enters the cache."""
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "empty.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    for add, value in ((writer.add_block_count, 2), (writer.add_context_length, 128),
                       (writer.add_embedding_length, 32), (writer.add_feed_forward_length, 48),
                       (writer.add_head_count, 4), (writer.add_head_count_kv, 2),
                       (writer.add_layer_norm_rms_eps, 1e-5), (writer.add_vocab_size, 16)):
        add(value)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"t{i}" for i in range(16)])
    writer.add_token_types([1] * 16)
    writer.add_token_merges([])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    before = path.read_bytes()
    capsys.readouterr()
    code = run_cli("upcycle", path, "--experts", 2, "--topk", 1, "--output", tmp_path / "out")
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error")]
    assert code == 2 and "Traceback" not in err
    assert errors == [err.strip().splitlines()[-1]], err  # one error line, the last thing said
    assert f"GGUF file {path} lacks 21 of the llama model's tensors" in errors[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.gguf"] and path.read_bytes() == before
    assert not list(fresh_cache.rglob("*")), list(fresh_cache.rglob("*"))  # no dequantized folder, no lock


# ---------------------------------------------------------------------------- MoE sources (moeify split)


def mixtral_and_remote(tmp_path: Path) -> tuple[Path, Path]:
    llama = make_tiny("llama", tmp_path / "llama")
    for fmt, name in (("native", "mixtral"), ("remote", "remote")):
        assert run_cli("upcycle", llama, "--experts", 4, "--topk", 2, "--format", fmt, "--output", tmp_path / name) == 0
    shutil.rmtree(llama)
    return tmp_path / "mixtral", tmp_path / "remote"


def test_moe_sources_that_do_not_match_their_config(tmp_path: Path, capsys):
    mixtral, remote = mixtral_and_remote(tmp_path / "src")
    qwen3 = make_qwen_moe("qwen3_moe", tmp_path / "src" / "qwen3", head_dim=8)
    split = ("split", "--granularity", 2)
    cases = [
        (mixtral, {"num_hidden_layers": 2}, ("num_hidden_layers=2 but the weights hold layers 0..2",)),
        (mixtral, {"num_local_experts": 2}, ("block_sparse_moe.gate.weight is (4, 64)", "num_local_experts=2")),
        (qwen3, {"moe_intermediate_size": 32}, ("experts.0.down_proj.weight is (32, 16)", "moe_intermediate_size=32")),
        (qwen3, {"num_experts": 8}, ("num_experts=8 and num_local_experts=4", "two names")),
        (remote, {"moe": "expert_intermediate_size=50"}, ("experts.0.gate_proj.weight is (96, 64)",
                                                          "moe.expert_intermediate_size=50")),
        (remote, {"moe": "num_experts=6"}, ("model.layers.0.mlp.experts.4.gate_proj.weight", "missing")),
        (remote, {"moe": "num_experts=3"}, ("model.layers.0.mlp.router.weight is (4, 64)", "(3, 64)")),
        (remote, {"base_config": "hidden_size=128"}, ("model.embed_tokens.weight", "base_config.hidden_size=128")),
        (remote, {"moe": "num_experts=1000000000"}, ("moe.num_experts must be an integer from 0 to 16384",)),
    ]
    for source, change, needles in cases:
        config = json.loads((source / "config.json").read_text())
        for key, value in change.items():
            if isinstance(value, str) and "=" in value:  # a field of a section: "field=number"
                field, number = value.split("=")
                config[key] = config[key] | {field: int(number)}
            else:
                config[key] = value
        broken = tmp_path / "broken"
        shutil.copytree(source, broken)
        (broken / "config.json").write_text(json.dumps(config))
        refused(tmp_path, capsys, broken, *needles, command=split)
        shutil.rmtree(broken)


# ---------------------------------------------------------------------------- the validator itself


def saved(folder: Path):
    """A folder as convert() reads it: the checkpoint under its reader's in-memory names, and the reader."""
    ckpt = Checkpoint(folder)
    reader = moe_source_for(ckpt.config) or adapter_for(ckpt.config)
    return (reader.loaded(ckpt) if hasattr(reader, "loaded") else ckpt), reader


@pytest.mark.parametrize("family", list(TINY))
@pytest.mark.parametrize("tied", [True, False])
def test_every_family_as_transformers_saves_it_passes(tmp_path: Path, family: str, tied: bool):
    """Exact: the names and shapes expected are those transformers' own save_pretrained writes."""
    folder = make_tiny(family, tmp_path / family, tie_word_embeddings=tied)
    ckpt, reader = saved(folder)
    check_weights(ckpt, reader)
    model = validation.empty_model(ckpt.config)
    expected = validation.expected_shapes(model, reader)
    untied = {n: s for n, s in expected.items() if n in ckpt.tensors or n not in model.all_tied_weights_keys}
    assert {n: i.shape for n, i in ckpt.tensors.items()} == untied


def test_every_moe_source_as_saved_passes(tmp_path: Path):
    mixtral, remote = mixtral_and_remote(tmp_path)
    sources = [mixtral, remote,
               make_qwen_moe("qwen3_moe", tmp_path / "qwen3", head_dim=8, mlp_only_layers=[0]),
               make_qwen_moe("qwen2_moe", tmp_path / "qwen2", shared_expert_intermediate_size=24),
               make_qwen_moe("qwen2_moe", tmp_path / "qwen2-0", shared_expert_intermediate_size=0)]
    for family in ("gpt2", "gpt_neox", "phi3"):  # remote outputs over families with their own names
        dense = make_tiny(family, tmp_path / family)
        remote_output = tmp_path / f"r-{family}"
        assert run_cli("upcycle", dense, "--experts", 2, "--format", "remote", "--output", remote_output) == 0
        sources.append(remote_output)
    for folder in sources:
        ckpt, reader = saved(folder)
        assert reader.model_type in ("mixtral", "moeify", "qwen3_moe", "qwen2_moe"), folder
        check_weights(ckpt, reader)


def test_legacy_gpt2_names_pass(tmp_path: Path):
    """OpenAI's GPT-2 checkpoints: no `transformer.` prefix and causal-mask buffers, which transformers drops."""
    folder = make_tiny("gpt2", tmp_path / "gpt2")
    tensors = {name.removeprefix("transformer."): t for name, t in load_file(folder / "model.safetensors").items()}
    tensors |= {f"h.{i}.attn.bias": torch.ones(1, 1, 64, 64) for i in range(2)}
    save_file(tensors, folder / "model.safetensors", {"format": "pt"})
    check_weights(*saved(folder))


def test_a_passed_check_is_remembered_for_the_same_config_and_shapes(tmp_path: Path, monkeypatch, fresh_cache):
    folder = make_tiny("llama", tmp_path / "llama")
    check_weights(*saved(folder))
    assert len(list((fresh_cache / "checked").iterdir())) == 1
    built = []
    monkeypatch.setattr(validation, "empty_model", lambda config: built.append(config) or pytest.fail("rebuilt"))
    check_weights(*saved(folder))  # remembered: no model is built
    assert not built
    edit_config(folder, rms_norm_eps=1e-5)  # any change of config.json is checked afresh
    with pytest.raises(pytest.fail.Exception, match="rebuilt"):
        check_weights(*saved(folder))
    monkeypatch.undo()
    edit_config(folder, vocab_size=300)  # a failed check is never remembered
    for _ in range(2):
        with pytest.raises(MoeifyError, match="vocab_size=300"):
            check_weights(*saved(folder))


def test_the_layer_count_is_checked_before_any_model_is_built(tmp_path: Path, monkeypatch):
    folder = edit_config(make_tiny("llama", tmp_path / "llama"), num_hidden_layers=1000)
    monkeypatch.setattr(validation, "empty_model", lambda config: pytest.fail("a 1000-layer model was built"))
    with pytest.raises(MoeifyError, match="num_hidden_layers=1000 but the weights hold layers 0..2"):
        check_weights(*saved(folder))


def test_every_adapter_is_covered():
    assert set(ADAPTERS) == set(TINY)  # a new family gets a tiny model, and with it the tests above
