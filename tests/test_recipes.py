"""Recipes: `moeify apply` of every shipped recipe, command-line overrides, and moeify.json replayed
bit for bit."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from moeify import recipe
from moeify.spec import Mode, Spec
from tests.fixtures import make_tiny, run_cli
from tests.test_verify import with_tokenizer

CALIBRATION = "The quick brown fox jumps over the lazy dog while the cat sleeps by the fire. " * 80




def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out |= load_file(shard)
    return out


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A tiny Llama with a tokenizer (a split calibrates on text)."""
    return with_tokenizer(make_tiny("llama", tmp_path_factory.mktemp("recipes") / "llama"))


def test_shipped_recipes_are_documented_and_valid():
    shipped = recipe.shipped()
    assert set(shipped) == {"mixtral", "deepseekmoe", "qwen-moe", "switch", "split", "split-heal"}
    for name, path in shipped.items():
        first = path.read_text().splitlines()[0]
        assert first.startswith("# "), name
        assert f"moeify apply recipes/{name}.yaml " in path.read_text(), name  # the exact command
        data = recipe.read(path)
        assert not {"intermediate_size", "moe_intermediate_size"} & set(data)  # relative to the source
        recipe.load(path)  # validates into a Spec


EXPECTED = {  # recipe -> (routed experts, active, shared, MoE layers of the 3)
    "mixtral": (8, 2, 0, [0, 1, 2]),
    "deepseekmoe": (64, 8, 1, [1, 2]),
    "qwen-moe": (60, 4, 1, [0, 1, 2]),
    "switch": (8, 1, 0, [1]),
    "split": (8, 4, 0, [0, 1, 2]),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_apply_every_shipped_recipe(name, source, tmp_path):
    extra = ()
    if name == "split":  # calibrate on a small file rather than text sampled from the model: faster
        (tmp_path / "calibration.txt").write_text(CALIBRATION)
        extra = ("--set", f"calibration={tmp_path / 'calibration.txt'}", "--set", "calibration_tokens=600")
    output = tmp_path / name
    assert run_cli("apply", name, source, "--output", output, *extra) == 0
    record = json.loads((output / "moeify.json").read_text())
    spec = recipe.spec_of(record)
    routed, active, shared, layers = EXPECTED[name]
    assert (spec.routed_experts, spec.active_experts, spec.shared_experts) == (routed, active, shared)
    assert record["moe_layer_indices"] == layers
    body = (output / "README.md").read_text()
    caveat = "training-free split only approximates" if spec.mode is Mode.SPLIT else "needs further training"
    assert caveat in body and f"| method | {spec.mode.value} |" in body
    remote = record["target"] == "remote"
    model, info = AutoModelForCausalLM.from_pretrained(output, trust_remote_code=remote, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert sum(p.numel() for p in model.parameters()) == record["total_params"]
    with torch.no_grad():
        logits = model(torch.arange(3, 19)[None]).logits
    assert logits.shape == (1, 16, 211) and torch.isfinite(logits).all()


def test_replaying_moeify_json_is_bit_for_bit(source, tmp_path, monkeypatch):
    first = tmp_path / "first"
    assert run_cli("upcycle", source, "--output", first, "--experts", 4, "--topk", 2, "--granularity", 2,
                   "--noise", 0.01, "--drop-ratio", 0.3, "--seed", 7, "--max-shard-size", "300KB") == 0
    # No SOURCE: the record names it, by its folder name only (no absolute path), found from beside it.
    monkeypatch.chdir(source.parent)
    assert run_cli("apply", first / "moeify.json", "--output", tmp_path / "again") == 0
    a, b = tensors(first), tensors(tmp_path / "again")
    assert a.keys() == b.keys() and len(a) > 10
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    for name in ("config.json", "model.safetensors.index.json"):
        assert (first / name).read_bytes() == (tmp_path / "again" / name).read_bytes()
    # Noise and drop really happened: two experts of one layer differ, so equality above means something.
    experts = sorted(k for k in a if "experts" in k and k.endswith("w1.weight") and ".layers.0." in k)
    assert not torch.equal(a[experts[0]], a[experts[2]])


def test_overrides_only_what_was_passed(source, tmp_path):
    output = tmp_path / "out"
    assert run_cli("apply", recipe.find("mixtral"), source, "--output", output, "--experts", 4,
                   "--set", "seed=3", "--set", "router-init=zeros") == 0
    spec = recipe.spec_of(json.loads((output / "moeify.json").read_text()))
    assert (spec.experts, spec.topk, spec.seed, spec.router_init.value) == (4, 2, 3, "zeros")  # topk: the recipe's


def test_record_keys_are_exactly_what_conversion_adds(source, tmp_path):
    assert run_cli("apply", "mixtral", source, "--output", tmp_path / "out") == 0
    record = json.loads((tmp_path / "out" / "moeify.json").read_text())
    spec_fields = {f.name for f in dataclasses.fields(Spec)}
    assert set(record) - spec_fields == recipe.RECORD_KEYS
    assert recipe.spec_of(record) == recipe.load(recipe.find("mixtral"))


@pytest.mark.parametrize("text,message", [
    ("experts: 4\nexpertz: 2\ncolour: red\n", "unknown conversion field(s) colour, expertz"),
    ("trian: {data: x.txt}\n", "shared_sources, source, split_router, topk, train"),  # train: and source: are fields
    ("experts: eight\n", "recipe field experts must be a whole number (got 'eight')"),
    ("noise: true\n", "recipe field noise must be a number"),
    ("format: sideways\n", "unknown format 'sideways'"),
    ("- experts\n", "must be a mapping of conversion fields"),
    ("experts: [1,\n", "cannot read recipe"),
    ("topk: 9\n", "--topk must be between 1 and --experts (8)"),
])
def test_bad_recipe_is_one_line_and_writes_nothing(source, tmp_path, capsys, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert run_cli("apply", path, source, "--output", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("error: ")
    assert not (tmp_path / "out").exists()


def test_bad_override_and_missing_recipe(source, tmp_path, capsys):
    assert run_cli("apply", "mixtral", source, "--output", tmp_path / "o", "--set", "experts") == 2
    assert "is not FIELD=VALUE" in capsys.readouterr().err
    assert run_cli("apply", "no-such-recipe", source, "--output", tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert "neither a file nor a shipped recipe (deepseekmoe, mixtral, qwen-moe, split-heal, split, switch;" in err
    assert f"they are in {recipe.SHIPPED})" in err  # where to look
    assert run_cli("apply", "mixtral", "--output", tmp_path / "o") == 2
    assert "names no source" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_spec_of_reads_a_split_recipe():
    spec = recipe.load(recipe.find("split"))
    assert spec.mode is Mode.SPLIT and spec.granularity == 8 and spec.topk == 4 and spec.refit


@pytest.mark.parametrize("name", ["switch", "recipes/switch.yaml", "switch.yaml"])
def test_shipped_recipes_work_from_any_directory(name, source, tmp_path, monkeypatch):
    """By name or by its path in the repo, from a directory that holds no recipes/ folder."""
    monkeypatch.chdir(tmp_path)
    assert not Path("recipes").exists()
    assert run_cli("apply", name, source, "--output", "out") == 0
    assert recipe.spec_of(json.loads(Path("out/moeify.json").read_text())).topk == 1


@pytest.mark.parametrize("engine", ["any", "transformers"])
def test_switch_output_has_no_zero_width_shared_expert(engine, source, tmp_path, recwarn):
    """Qwen2-MoE without shared experts gets one zero neuron, never a zero-wide shared expert, which made
    transformers warn about zero-element tensors on every load."""
    output = tmp_path / "switch"
    assert run_cli("apply", "switch", source, "--set", f"engine={engine}", "--output", output) == 0
    config = json.loads((output / "config.json").read_text())
    assert config["model_type"] == "qwen2_moe" and config["shared_expert_intermediate_size"] == 1
    recwarn.clear()
    AutoModelForCausalLM.from_pretrained(output)
    assert not [w for w in recwarn if "zero-element" in str(w.message)]
