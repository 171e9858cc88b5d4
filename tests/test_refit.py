"""moeify split --refit: least-squares down projections for the pieces each token selects."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from moeify.errors import MoeifyError
from moeify.refit import refitted_down
from moeify.spec import Mode, Spec
from moeify.transforms import FFN
from tests.fixtures import logits, make_tiny
from tests.test_split import HELDOUT, add_char_tokenizer, refused, run, split

H, I, G = 16, 32, 4
GROUPS = list(torch.arange(I).chunk(G))


@pytest.fixture
def llama(tmp_path: Path) -> Path:
    return add_char_tokenizer(make_tiny("llama", tmp_path / "tiny-llama"))


def _ffn(seed: int = 0) -> FFN:
    gen = torch.Generator().manual_seed(seed)
    return FFN(gate=torch.randn(I, H, generator=gen), up=torch.randn(I, H, generator=gen) / 4,
               down=torch.randn(H, I, generator=gen) / 4)


def _inputs(tokens: int, seed: int) -> torch.Tensor:
    """Hidden states near a 4-dimensional subspace, as real ones are: neurons then fire together, and the
    pieces a token selects can stand in for those it does not."""
    gen = torch.Generator().manual_seed(seed)
    basis = torch.randn(4, H, generator=torch.Generator().manual_seed(99))
    return torch.randn(tokens, 4, generator=gen) @ basis + 0.1 * torch.randn(tokens, H, generator=gen)


def _error(ffn: FFN, down: torch.Tensor, router: torch.Tensor, topk: int, x: torch.Tensor) -> float:
    """Squared distance between the dense FFN's output and that of each token's top-k pieces with `down`."""
    active = F.silu(x @ ffn.gate.T) * (x @ ffn.up.T)
    chosen = torch.zeros(len(x), G, dtype=torch.bool).scatter_(1, (x @ router.T).topk(topk, dim=1).indices, True)
    mask = chosen[:, torch.arange(I) // (I // G)]
    return ((active * mask) @ down.T - active @ ffn.down.T).pow(2).sum().item()


def test_with_every_piece_selected_the_refit_is_the_dense_down_projection():
    ffn, router = _ffn(), torch.randn(G, H)
    down = refitted_down(ffn, F.silu, [], GROUPS, router, G, [_inputs(500, 1)])
    assert torch.allclose(down, ffn.down, atol=1e-4)


def test_the_refit_repays_what_unselected_pieces_would_add_on_text_it_never_saw():
    ffn, router = _ffn(), torch.randn(G, H, generator=torch.Generator().manual_seed(2))
    down = refitted_down(ffn, F.silu, [], GROUPS, router, 2, [_inputs(2000, 1), _inputs(2000, 3)])
    for seen in (_inputs(2000, 1), _inputs(2000, 4)):  # calibration inputs, then new ones
        assert _error(ffn, down, router, 2, seen) < 0.8 * _error(ffn, ffn.down, router, 2, seen)


def test_shared_pieces_count_as_always_selected():
    ffn, router = _ffn(), torch.randn(G - 1, H)
    shared, routed = GROUPS[:1], GROUPS[1:]
    # every routed piece selected and the shared one always on: the whole FFN, so nothing to repay
    down = refitted_down(ffn, F.silu, shared, routed, router, G - 1, [_inputs(500, 1)])
    assert torch.allclose(down, ffn.down, atol=1e-4)


def test_a_refitted_split_changes_only_down_projections_and_comes_closer_to_the_dense_model(llama, tmp_path):
    plain = split(llama, tmp_path / "plain", "--granularity", 4, "--topk", 2)
    refit = split(llama, tmp_path / "refit", "--granularity", 4, "--topk", 2, "--refit")
    assert plain == refit  # same architecture: only weights differ
    before, after = (load_file(tmp_path / name / "model.safetensors") for name in ("plain", "refit"))
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all(name.endswith("down_proj.weight") for name in changed)
    text = torch.tensor([[ord(c) - 29 for c in HELDOUT.read_text()[:200] if 32 <= ord(c) < 127]])
    dense = logits(llama, text).log_softmax(-1)
    kl = {name: F.kl_div(logits(tmp_path / name, text, trust_remote_code=True).log_softmax(-1), dense,
                         log_target=True, reduction="batchmean").item() for name in ("plain", "refit")}
    assert kl["refit"] < 0.8 * kl["plain"], kl
    record = json.loads((tmp_path / "refit" / "moeify.json").read_text())
    assert record["refit"] is True
    assert "refitted by least squares" in (tmp_path / "refit" / "README.md").read_text()


def test_refit_of_an_exact_split_is_refused(llama, tmp_path, capsys):
    line = refused(capsys, "split", llama, "--granularity", 4, "--refit", "--output", tmp_path / "out")
    assert "every piece is selected (the split is exact)" in line
    assert not (tmp_path / "out").exists()


def test_refit_of_a_moe_source_is_refused(llama, tmp_path, capsys):
    run("upcycle", llama, "--experts", 2, "--topk", 1, "--output", tmp_path / "mixtral")
    line = refused(capsys, "split", tmp_path / "mixtral", "--granularity", 2, "--refit", "--output", tmp_path / "out")
    assert "a MoE source's split is exact already" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("fields,message", [
    ({"mode": Mode.UPCYCLE, "refit": True}, "refit belongs to a split"),
    ({"mode": Mode.SPLIT, "experts": 1, "granularity": 4, "topk": 2, "refit": "yes"}, "refit must be true or false"),
])
def test_a_recipe_with_a_misplaced_or_malformed_refit_is_refused(fields, message):
    with pytest.raises(MoeifyError, match=message):
        Spec(**fields)


def test_a_bfloat16_source_is_refitted_in_float32_and_written_in_bfloat16(tmp_path):
    source = add_char_tokenizer(make_tiny("llama", tmp_path / "bf16", dtype=torch.bfloat16))
    split(source, tmp_path / "plain", "--granularity", 4, "--topk", 2)
    split(source, tmp_path / "refit", "--granularity", 4, "--topk", 2, "--refit")
    plain, refit = (load_file(tmp_path / name / "model.safetensors") for name in ("plain", "refit"))
    down = "model.layers.0.mlp.experts.0.down_proj.weight"
    assert refit[down].dtype == torch.bfloat16 and not torch.equal(refit[down], plain[down])
