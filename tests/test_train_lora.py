"""`moeify train --lora-rank`: peft adapters on the routed experts of every format, merged into the
written checkpoint or kept beside it; without peft, one line saying how to get it."""
# ruff: noqa: F811 (the tests take test_train's `models` fixture, imported by name, as a parameter)

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from moeify.loading import code_of, load_model
from moeify.training import lora
from moeify.training.selection import select
from moeify.training.settings import Trainable
from tests.test_cli_errors import assert_one_line_error
from tests.test_train import models, record_of, same_bits, tensors_of, train  # noqa: F401 (models: a fixture)

EXPERT = re.compile(r"\.experts\.\d+\.")  # a routed expert's tensor, as every format writes it
ROUTERS = {"mixtral": "*.gate.weight", "qwen2_moe": "*.gate.weight", "remote": "*router*"}


def lora_run(models: dict[str, Path], fmt: str, out: Path, *options: object) -> int:
    """Routers frozen: the adapters are all that trains."""
    return train(models[fmt], out, "--train", "experts", "--freeze", ROUTERS[fmt], "--lora-rank", 4,
                 "--steps", 3, "--lr", "1e-2", *options)


@pytest.mark.parametrize("fmt", ["mixtral", "qwen2_moe", "remote"])
def test_lora_changes_only_the_experts_and_loads_in_its_format(models: dict[str, Path], tmp_path: Path, fmt: str):
    assert lora_run(models, fmt, tmp_path / "out") == 0
    before, after = tensors_of(models[fmt]), tensors_of(tmp_path / "out")
    assert {n: (t.shape, t.dtype) for n, t in before.items()} == {n: (t.shape, t.dtype) for n, t in after.items()}
    experts = {n for n in before if EXPERT.search(n)}
    assert experts and all(not torch.equal(before[n], after[n]) for n in experts)  # the merged adapters
    assert all(same_bits(before[n], after[n]) for n in set(before) - experts)
    _, info = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=fmt == "remote",
                                                       output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    settings = record_of(tmp_path / "out")["training"][-1]["settings"]
    assert (settings["lora_rank"], settings["merge_lora"]) == (4, True)
    assert not (tmp_path / "out" / lora.ADAPTER).exists()


@pytest.mark.parametrize("fmt", ["mixtral", "remote"])
def test_only_adapters_and_what_train_selects_are_trainable(models: dict[str, Path], fmt: str):
    wrapped = lora.wrap(load_model(models[fmt], code_of(models[fmt], fmt == "remote")), rank=4, alpha=None)
    selection = select(wrapped, Trainable.EXPERTS)
    adapters = {n for n, _ in wrapped.named_parameters() if lora.is_adapter(n)}
    assert adapters and adapters <= set(selection.trainable)
    assert set(selection.trainable) - adapters == set(selection.routers)  # --train experts: + the routers
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert trainable == set(selection.trainable) and not trainable & lora.adapted(wrapped)


def test_no_merge_keeps_the_base_weights_and_writes_the_adapter(models: dict[str, Path], tmp_path: Path):
    from peft import PeftModel

    assert lora_run(models, "mixtral", tmp_path / "merged") == 0
    assert lora_run(models, "mixtral", tmp_path / "kept", "--no-merge-lora") == 0
    before, kept = tensors_of(models["mixtral"]), tensors_of(tmp_path / "kept")
    assert set(before) == set(kept) and all(same_bits(before[n], kept[n]) for n in before)
    adapter = tmp_path / "kept" / lora.ADAPTER
    assert sorted(p.name for p in adapter.iterdir()) == ["README.md", "adapter_config.json",
                                                         "adapter_model.safetensors"]
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "kept", dtype=torch.float32)
    with_adapter = PeftModel.from_pretrained(base, adapter).merge_and_unload()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    ids = torch.arange(3, 40).reshape(1, -1)
    with torch.no_grad():
        assert torch.allclose(with_adapter(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-5)


def test_without_peft_lora_is_one_line(models: dict[str, Path], tmp_path: Path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` raises ImportError, as when not installed
    capsys.readouterr()
    code = lora_run(models, "mixtral", tmp_path / "out")
    assert_one_line_error(capsys, code, "--lora-rank", "pip install 'moeify[train]'")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.checkpoints").exists()


def test_lora_alpha_without_a_rank_is_one_line(models: dict[str, Path], tmp_path: Path, capsys):
    capsys.readouterr()
    code = train(models["mixtral"], tmp_path / "out", "--lora-alpha", 8)
    assert_one_line_error(capsys, code, "--lora-alpha", "--lora-rank")
    assert not (tmp_path / "out").exists()


def test_a_lora_run_resumes_to_the_same_weights(models: dict[str, Path], tmp_path: Path):
    """Checkpoints hold the adapters (and their optimizer state): resuming from step 2 reaches the
    weights of the uninterrupted run."""
    options = ("--save-every", 2, "--steps", 4)
    assert lora_run(models, "mixtral", tmp_path / "out", *options) == 0
    whole = tensors_of(tmp_path / "out")
    shutil.rmtree(tmp_path / "out")
    shutil.rmtree(tmp_path / "out.checkpoints" / "step-00000004")
    assert lora_run(models, "mixtral", tmp_path / "out", *options, "--resume") == 0
    resumed = tensors_of(tmp_path / "out")
    assert set(whole) == set(resumed) and all(same_bits(whole[n], resumed[n]) for n in whole)
