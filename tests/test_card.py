"""The model card: YAML front matter the Hub reads, the conversion, parameters, how to load it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from moeify import card
from moeify.conversion import convert
from moeify.spec import Format, Spec
from tests.fixtures import make_tiny


def parts(folder: Path) -> tuple[dict, str]:
    """The card's front matter (parsed as YAML, as the Hub does) and its body."""
    text = (folder / "README.md").read_text()
    match = re.match(r"^---\n(.*?)\n---\n(.*)$", text, re.DOTALL)
    assert match, "the card must open with YAML front matter"
    return yaml.safe_load(match.group(1)), match.group(2)


@pytest.fixture(scope="module")
def hub_source(tmp_path_factory) -> Path:
    """A source inside a Hub cache folder (its repo is known) whose own card names a license."""
    root = tmp_path_factory.mktemp("card")
    folder = make_tiny("llama", root / "hub" / "models--acme--tiny-llama" / "snapshots" / "0123abcd")
    (folder / "README.md").write_text("---\nlicense: llama3.2\ntags: [text]\n---\n# Tiny\n")
    return folder


def test_native_card(hub_source, tmp_path):
    result = convert(hub_source, tmp_path / "tiny-moe", Spec(experts=4, topk=2), source=str(hub_source))
    front, body = parts(tmp_path / "tiny-moe")
    assert front["base_model"] == "acme/tiny-llama" and front["base_model_relation"] == "finetune"
    assert front["license"] == "llama3.2"  # copied from the source's card
    assert front["library_name"] == "transformers" and front["pipeline_tag"] == "text-generation"
    assert {"moe", "moeify", "mixtral", "llama", "upcycle"} <= set(front["tags"])
    record = json.loads((tmp_path / "tiny-moe" / "moeify.json").read_text())
    size = card.human(sum(p.stat().st_size for p in (tmp_path / "tiny-moe").glob("*.safetensors")), "B")
    assert f"| {card.human(record['total_params'])} | {card.human(record['active_params'])} | {size} |" in body
    assert "| noise / drop ratio | 0.0 / 0.0 |" in body and "partition" not in body
    assert "| routed experts per MoE layer | 4 (4 × granularity 1) |" in body
    assert "| MoE layers | 3 of 3 (all) |" in body
    assert 'AutoModelForCausalLM.from_pretrained("tiny-moe")' in body and "trust_remote_code" not in body
    assert "needs further training" in body
    assert "moeify apply moeify.json acme/tiny-llama --output tiny-moe" in body  # the repo, not the cache path
    assert str(hub_source.parent) not in (tmp_path / "tiny-moe" / "README.md").read_text()
    assert result.target == "mixtral"


def test_remote_card_says_trust_remote_code(tiny_llama, tmp_path):
    convert(tiny_llama, tmp_path / "out", Spec(experts=4, topk=2, moe_layers="every:2", format=Format.REMOTE),
            source=str(tiny_llama))
    front, body = parts(tmp_path / "out")
    assert "base_model" not in front and "license" not in front  # a local folder without a card: unknown
    assert {"moe", "moeify", "remote", "llama"} <= set(front["tags"])
    assert 'from_pretrained("out", trust_remote_code=True)' in body
    assert "| MoE layers | 1 of 3 (every:2) |" in body


def test_refresh_for_a_repo_keeps_license_and_base_model(hub_source, tmp_path):
    convert(hub_source, tmp_path / "out", Spec(experts=2, topk=1, format=Format.REMOTE), source=str(hub_source))
    card.refresh(tmp_path / "out", "me/tiny-llama-2x")
    front, body = parts(tmp_path / "out")
    assert front["base_model"] == "acme/tiny-llama" and front["license"] == "llama3.2"
    assert {"moe", "moeify", "remote", "llama"} <= set(front["tags"])
    assert body.startswith("\n# tiny-llama-2x\n")
    assert 'from_pretrained("me/tiny-llama-2x", trust_remote_code=True)' in body
    assert 'AutoTokenizer.from_pretrained("me/tiny-llama-2x", trust_remote_code=True)' in body
    assert "| MoE layers | 3 of 3 (all) |" in body


def test_base_model_is_what_the_source_resolved_to():
    assert card.base_of({"kind": "hub", "repo": "Qwen/Qwen2.5-0.5B", "revision": "abc"}) == ("Qwen/Qwen2.5-0.5B",
                                                                                             "finetune")
    fallback = {"kind": "gguf", "file": "x.Q4_1.gguf", "sha256": "0" * 64, "repo": "HuggingFaceTB/SmolLM2-135M-Instruct"}
    assert card.base_of(fallback) == ("HuggingFaceTB/SmolLM2-135M-Instruct", "quantized")
    assert card.base_of({"kind": "gguf", "file": "x.gguf", "sha256": "0" * 64}) == (None, None)
    assert card.base_of({"kind": "folder", "name": "x", "weights_sha256": "0" * 64}) == (None, None)


@pytest.mark.parametrize("options,row", [
    ((), "| calibration | none needed: every piece is active |"),
    (("--topk", 2), f"| calibration | {card.BUILTIN_CORPUS} (512 tokens) |"),
])
def test_split_card_names_what_calibration_read(tmp_path, capsys, options, row):
    """Without --calibration a split reads moeify's built-in corpus (nothing is sampled from the model),
    and with every piece active it reads nothing."""
    from tests.fixtures import run_cli
    from tests.test_split import add_char_tokenizer

    source = add_char_tokenizer(make_tiny("llama", tmp_path / "src"))
    assert run_cli("split", source, "--granularity", 4, *options, "--calibration-tokens", 512,
                   "--output", tmp_path / "out") == 0
    _, body = parts(tmp_path / "out")
    assert row in body and "sampled" not in body
