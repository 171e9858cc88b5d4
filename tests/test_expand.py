"""moeify expand: more routed experts in every MoE layer, exact at step 0 where the format can say so."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from moeify.checkpoint import Checkpoint
from moeify.expand import frozen_parameters
from tests.fixtures import logits, make_tiny, run_cli
from tests.test_cli_errors import assert_one_line_error, leftovers
from tests.test_merge import loads_cleanly
from tests.test_split import add_char_tokenizer

TOKENS = torch.randint(3, 90, (2, 16), generator=torch.Generator().manual_seed(2))
# format -> (family, upcycle arguments, expert tensor name of (layer, j, projection), router name of layer)
FORMATS = {
    "remote": ("llama", ("--format", "remote"), "model.layers.{i}.mlp.experts.{j}.up_proj.weight",
               "model.layers.{i}.mlp.router.weight"),
    "mixtral": ("llama", (), "model.layers.{i}.block_sparse_moe.experts.{j}.w3.weight",
                "model.layers.{i}.block_sparse_moe.gate.weight"),
    "qwen2_moe": ("llama", ("--shared-experts", 1), "model.layers.{i}.mlp.experts.{j}.up_proj.weight",
                  "model.layers.{i}.mlp.gate.weight"),
    "qwen3_moe": ("qwen3", (), "model.layers.{i}.mlp.experts.{j}.up_proj.weight", "model.layers.{i}.mlp.gate.weight"),
}


def moe(tmp_path: Path, fmt: str, *extra: object) -> Path:
    """A 4-expert top-2 upcycle (noisy experts, so copies are told apart) in the given format."""
    family, args, _, _ = FORMATS[fmt]
    dense = add_char_tokenizer(make_tiny(family, tmp_path / "dense"))
    out = tmp_path / "moe"
    assert run_cli("upcycle", dense, "--experts", 4, "--topk", 2, "--noise", 0.01, *args, *extra, "--output", out) == 0
    assert json.loads((out / "config.json").read_text())["model_type"] == ("moeify" if fmt == "remote" else fmt)
    return out


def experts_in(config: dict) -> int:
    return (config.get("moe") or {}).get("num_experts") or config.get("num_local_experts") or config["num_experts"]


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_expand_appends_copies_and_keeps_the_rest(tmp_path: Path, capsys, fmt: str):
    source, out = moe(tmp_path, fmt), tmp_path / "out"
    assert run_cli("expand", source, "--add", 2, "--from", "copy:1", "--output", out) == 0
    config = json.loads((out / "config.json").read_text())
    assert experts_in(config) == 6 and config["architectures"] == json.loads((source / "config.json").read_text())["architectures"]
    remote = fmt == "remote"
    loads_cleanly(out, remote=remote)
    _, _, expert, router = FORMATS[fmt]
    old, new = Checkpoint(source), Checkpoint(out)
    for name in old.names():  # old experts, attention, norms, shared experts: untouched
        if not name.endswith((".gate.weight", ".router.weight")) or "shared_expert" in name:
            assert torch.equal(old.read(name), new.read(name)), name
    for i in range(2 if fmt == "qwen3_moe" else 3):
        for j in (4, 5):
            assert torch.equal(new.read(expert.format(i=i, j=j)), old.read(expert.format(i=i, j=1)))
        assert torch.equal(new.read(router.format(i=i))[:4], old.read(router.format(i=i)))
    said = capsys.readouterr().out  # a measurement: on stdout with the summary
    if remote:  # claimed exact: the new experts' selection bias keeps them out
        assert "exact by construction" in said
        torch.testing.assert_close(logits(out, TOKENS, trust_remote_code=True),
                                   logits(source, TOKENS, trust_remote_code=True), rtol=0, atol=1e-4)
        assert new.read("model.layers.0.mlp.router.expert_bias").tolist()[:4] == [0.0] * 4
    else:  # no bias in these formats: said so, with the measured difference
        assert "not guaranteed" in said and "max |logit difference|" in said


def test_groups_of_pieces_stay_together(tmp_path: Path):
    source, out = moe(tmp_path, "remote", "--granularity", 2), tmp_path / "out"
    assert run_cli("expand", source, "--add", 1, "--from", "copy:0", "--output", out) == 0
    moe_ = json.loads((out / "config.json").read_text())["moe"]
    assert (moe_["num_experts"], moe_["num_experts_per_tok"]) == (10, 4)  # one more group of 2 pieces, top-k kept
    router = Checkpoint(out).read("model.layers.1.mlp.router.weight")
    assert torch.equal(router[8], router[9]) and torch.equal(router[8], router[0])
    torch.testing.assert_close(logits(out, TOKENS, trust_remote_code=True),
                               logits(source, TOKENS, trust_remote_code=True), rtol=0, atol=1e-4)


def test_new_experts_from_a_dense_model_and_from_the_busiest(tmp_path: Path):
    source = moe(tmp_path, "remote")
    other = make_tiny("llama", tmp_path / "other", seed=5)
    assert run_cli("expand", source, "--add", 1, "--from", other, "--output", tmp_path / "a") == 0
    assert torch.equal(Checkpoint(tmp_path / "a").read("model.layers.2.mlp.experts.4.down_proj.weight"),
                       Checkpoint(other).read("model.layers.2.mlp.down_proj.weight"))
    assert run_cli("expand", source, "--add", 1, "--output", tmp_path / "b") == 0  # copy:busiest by default
    origins = json.loads((tmp_path / "b" / "moeify.json").read_text())["expansion"]["origins"]
    assert sorted(origins) == ["0", "1", "2"] and all(0 <= o[0] < 4 for o in origins.values())


def test_frozen_experts_are_recorded_and_stay_fixed_through_a_training_step(tmp_path: Path):
    source, out = moe(tmp_path, "remote"), tmp_path / "out"
    assert run_cli("expand", source, "--add", 2, "--from", "copy:0", "--freeze", "old", "--output", out) == 0
    assert json.loads((out / "config.json").read_text())["moe"]["frozen_experts"] == [0, 1, 2, 3]
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, trust_remote_code=True)
    frozen = set(frozen_parameters(model, model.config))
    assert len(frozen) == 3 * 4 * 3  # layers x old experts x projections
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for name, p in model.named_parameters():
        p.requires_grad_(name not in frozen)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    # the new experts are selected once their bias is lifted (what aux-free balancing does while training)
    for block in model.blocks():
        block.router.expert_bias.zero_()
    model(TOKENS, labels=TOKENS).loss.backward()
    optimizer.step()
    after = dict(model.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in frozen)
    assert not torch.equal(before["model.layers.0.mlp.experts.4.up_proj.weight"],
                           after["model.layers.0.mlp.experts.4.up_proj.weight"])


def test_native_freeze_is_recorded_at_the_top_level(tmp_path: Path):
    source, out = moe(tmp_path, "mixtral"), tmp_path / "out"
    assert run_cli("expand", source, "--add", 1, "--from", "copy:0", "--freeze", "old", "--output", out) == 0
    assert json.loads((out / "config.json").read_text())["frozen_experts"] == [0, 1, 2, 3]


def test_an_expansion_replays_from_its_moeify_json(tmp_path: Path):
    source = moe(tmp_path, "remote")
    assert run_cli("expand", source, "--add", 2, "--noise", 0.01, "--output", tmp_path / "a") == 0
    assert run_cli("apply", tmp_path / "a" / "moeify.json", source, "--output", tmp_path / "b") == 0  # a local folder
    # is recorded by name only
    first, again = Checkpoint(tmp_path / "a"), Checkpoint(tmp_path / "b")
    assert first.names() == again.names()
    assert all(torch.equal(first.read(n), again.read(n)) for n in first.names())


@pytest.mark.parametrize("args,needles", [
    (("--add", 0), ("--add must be at least 1",)),
    (("--add", 1, "--from", "copy:7"), ("copy:7", "experts 0..3")),
    (("--add", 1, "--freeze", "new"), ("--freeze 'new'",)),
    (("--add", 1, "--from", "copy:x"), ("copy:J",)),
])
def test_bad_expand_is_one_line_and_writes_nothing(tmp_path: Path, capsys, args, needles):
    source, out = moe(tmp_path, "remote"), tmp_path / "out"
    capsys.readouterr()
    assert_one_line_error(capsys, run_cli("expand", source, *args, "--output", out), *needles)
    assert not out.exists() and not leftovers(out)


def test_expanding_a_dense_model_is_refused(tmp_path: Path, capsys):
    dense, out = make_tiny("llama", tmp_path / "dense"), tmp_path / "out"
    capsys.readouterr()
    assert_one_line_error(capsys, run_cli("expand", dense, "--add", 1, "--output", out),
                          "is a dense llama model", "moeify upcycle")
    assert not out.exists() and not leftovers(out)
