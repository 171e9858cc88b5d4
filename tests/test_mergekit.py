"""mergekit-moe configs (its documented YAML schema) applied by `moeify apply`, and what moeify refuses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moeify.checkpoint import Checkpoint
from tests.fixtures import run_cli
from tests.test_cli_errors import assert_one_line_error, leftovers
from tests.test_merge import KINDS, Models, build_models, loads_cleanly


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Models:
    return build_models(tmp_path_factory.mktemp("mergekit"))


def config(models: Models, **extra: str) -> str:
    """A mergekit-moe config as its README documents it: two experts with prompts, hidden gates."""
    digits, words = KINDS["digits"][0], KINDS["words"][0]
    text = f"""base_model: {models.base}
gate_mode: hidden
dtype: float32
experts_per_token: 1
experts:
  - source_model: {models.tunes['digits']}
    positive_prompts: {json.dumps(digits)}
    negative_prompts: {json.dumps(words[:1])}
  - source_model: {models.tunes['words']}
    positive_prompts: {json.dumps(words)}
"""
    return text + "".join(f"{key}: {value}\n" for key, value in extra.items())


def test_a_mergekit_moe_config_applies(models: Models, tmp_path: Path):
    path = tmp_path / "mergekit.yml"
    path.write_text(config(models))
    out = tmp_path / "out"
    assert run_cli("apply", path, "--output", out) == 0
    written = json.loads((out / "config.json").read_text())
    assert written["architectures"] == ["MixtralForCausalLM"]
    assert (written["num_local_experts"], written["num_experts_per_tok"], written["dtype"]) == (2, 1, "float32")
    loads_cleanly(out)
    merged, source = Checkpoint(out), Checkpoint(models.tunes["words"])
    assert torch.equal(merged.read("model.layers.1.block_sparse_moe.experts.1.w1.weight"),
                       source.read("model.layers.1.mlp.gate_proj.weight"))
    record = json.loads((out / "moeify.json").read_text())
    assert record["mode"] == "merge" and record["gate"] == "hidden" and record["source"] == "base"
    assert record["expert_sources"][0]["negative"] == KINDS["words"][0][:1]
    assert record["routing"]["mean_own_share"] > 0.5


def test_shared_experts_residual_scale_and_architecture_qwen(models: Models, tmp_path: Path, capsys):
    text = config(models, architecture="qwen").replace("gate_mode: hidden", "gate_mode: random")
    text = text.replace(f"  - source_model: {models.tunes['words']}\n",
                        f"  - source_model: {models.tunes['words']}\n    residual_scale: 0.5\n")
    text += f"shared_experts:\n  - source_model: {models.base}\n    positive_prompts: [\"anything\"]\n"
    path = tmp_path / "qwen.yml"
    path.write_text(text)
    out = tmp_path / "out"
    assert run_cli("apply", path, "--output", out) == 0
    assert "shared experts' prompts are not used" in capsys.readouterr().err
    written = json.loads((out / "config.json").read_text())
    assert written["architectures"] == ["Qwen2MoeForCausalLM"] and written["shared_expert_intermediate_size"] == 96
    loads_cleanly(out)
    merged, source = Checkpoint(out), Checkpoint(models.tunes["words"])
    down = source.read("model.layers.0.mlp.down_proj.weight")
    # routed and shared outputs weigh 1/2 each; residual_scale 0.5 multiplies this expert's on top
    torch.testing.assert_close(merged.read("model.layers.0.mlp.experts.1.down_proj.weight"), down * 0.25,
                               rtol=0, atol=0)
    record = json.loads((out / "moeify.json").read_text())
    assert record["gate"] == "random" and record["router_std"] == 1.0  # mergekit's random is a standard normal


@pytest.mark.parametrize("change,needles", [
    (lambda t: t + "merge_method: ties\n", ("'merge_method' is not one moeify supports",)),
    (lambda t: t.replace("    negative_prompts:", "    tokenizer: other\n    negative_prompts:"),
     ("experts[0] field 'tokenizer'",)),
    (lambda t: t.replace("gate_mode: hidden", "gate_mode: orthogonal"), ("gate_mode 'orthogonal'",)),
    (lambda t: t + "architecture: deepseek\n", ("architecture 'deepseek' is not one moeify writes",)),
    (lambda t: t.replace("base_model: ", "base_model: lora+"), ("applies a LoRA",)),
    (lambda t: t.replace("    negative_prompts:", "    noise_scale: 0.1\n    negative_prompts:"),
     ("different noise_scale values",)),
    (lambda t: t.replace("dtype: float32", "dtype: int8"), ("dtype 'int8'",)),
    (lambda t: t.replace("gate_mode: hidden", "gate_mode: [hidden]"), ("gate_mode ['hidden']",)),
    (lambda t: t.replace("dtype: float32", "dtype: {a: 1}"), ("dtype {'a': 1}",)),
])
def test_unsupported_mergekit_fields_are_one_line(models: Models, tmp_path: Path, capsys, change, needles):
    path = tmp_path / "bad.yml"
    path.write_text(change(config(models)))
    out = tmp_path / "out"
    assert_one_line_error(capsys, run_cli("apply", path, "--output", out), *needles)
    assert not out.exists() and not leftovers(out)
