"""moeify peer: PEER layers (product-key retrieval of single-neuron experts) from dense FFNs.

Exactness at full retrieval for four families, the product-key search against brute force,
training, the calibrated (training-free) retrieval, the config section and bad inputs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from moeify.peer import additive_fit, grid_side, place, retrieval_recall, valid_slots
from moeify.targets.remote_code.configuration_moeify import peer_section
from moeify.targets.remote_code.modeling_moeify import PeerBlock, is_padding
from tests.fixtures import logits, make_tiny, run_cli
from tests.test_split import CALIBRATION, HELDOUT, add_char_tokenizer

TOKENS = torch.randint(3, 200, (2, 24), generator=torch.Generator().manual_seed(0))


class Base:  # the base-config fields peer_section reads
    def __init__(self, intermediate_size: int, hidden_size: int = 16, num_hidden_layers: int = 2):
        self.intermediate_size, self.hidden_size, self.num_hidden_layers = intermediate_size, hidden_size, num_hidden_layers


def block(neurons: int, heads: int = 1, topk: int = 4, key_dim: int = 8, seed: int = 0, **peer) -> PeerBlock:
    torch.manual_seed(seed)
    section = peer_section(dict(num_neurons=neurons, num_heads=heads, num_neurons_per_head=topk,
                                key_dim=key_dim, **peer), Base(neurons))
    return PeerBlock(section, 16)


def load(folder: Path):
    model, info = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def refused(capsys, *args: object) -> str:
    """Run the CLI expecting exit code 2; return its one error line."""
    capsys.readouterr()
    assert run_cli(*args) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


# ---------------------------------------------------------------------------- exact at full retrieval


@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt2", "phi3"])
def test_full_retrieval_is_the_dense_model(tmp_path: Path, family: str):
    source = make_tiny(family, tmp_path / family)
    out = tmp_path / "peer"
    assert run_cli("peer", source, "--heads", "2", "--output", out) == 0  # --topk all (the default)
    config = json.loads((out / "config.json").read_text())
    assert config["peer"]["num_neurons_per_head"] == config["peer"]["num_neurons"]
    assert config["peer"]["peer_layers"] == [0, 1, 2] if family == "llama" else [0, 1]  # every layer
    model = load(out)
    paths = [config["peer"]["mlp_path"].replace("{i}", str(i)) for i in config["peer"]["peer_layers"]]
    assert all(type(model.get_submodule(path)).__name__ == "PeerBlock" for path in paths)  # the checkpoint's class
    dense = AutoModelForCausalLM.from_pretrained(source).eval()
    with torch.no_grad():
        expected = dense(TOKENS).logits
        assert (model(TOKENS).logits - expected).abs().max() < 1e-4
    greedy = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(TOKENS[:1, :5], **greedy), dense.generate(TOKENS[:1, :5], **greedy))
    model.save_pretrained(tmp_path / "again")  # the round trip keeps every tensor and the peer section
    for name in ("configuration_moeify.py", "modeling_moeify.py"):
        (tmp_path / "again" / name).write_bytes((out / name).read_bytes())
    assert (logits(tmp_path / "again", TOKENS, trust_remote_code=True) - expected).abs().max() < 1e-4


def test_padding_slots_hold_nothing_and_neurons_sit_on_valid_slots(tmp_path: Path):
    source = make_tiny("llama", tmp_path / "llama", intermediate_size=90)  # 10 x 10 grid, 10 padding slots
    out = tmp_path / "peer"
    assert run_cli("peer", source, "--output", out) == 0
    model = load(out)
    peer = model.model.layers[0].mlp
    slots = torch.arange(100)
    padding = is_padding(slots // 10, slots % 10, 10, 10)
    assert padding.sum() == 10
    for rows in (peer.gate_rows, peer.up_rows, peer.down_rows):
        assert rows.shape == (100, 64) and not rows[padding].any() and rows[~padding].abs().sum(1).min() > 0


# ---------------------------------------------------------------------------- the product-key search


@pytest.mark.parametrize("magnitude", [False, True])
@pytest.mark.parametrize("neurons", [49, 43, 50, 57, 64, 97])  # no padding, fewer than n, more than n
def test_product_key_top_k_is_the_brute_force_top_k(neurons: int, magnitude: bool):
    peer = block(neurons, heads=3, topk=7, key_dim=10, seed=neurons, magnitude=magnitude)
    n = peer.n
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(neurons))
    with torch.no_grad():
        slots, scores = peer.retrieve(x)
        halves = torch.einsum("thpd,hpnd->thpn", peer.query(x).view(64, 3, 2, 5), peer.sub_keys)
        every = (halves[:, :, 0, :, None] + halves[:, :, 1, None, :]).flatten(-2)  # (T, heads, n²): all N scores
    grid = torch.arange(n * n)
    every = every.abs() if magnitude else every  # magnitude: the largest |score|, both signs of the query
    every = every.masked_fill(is_padding(grid // n, grid % n, n, n * n - neurons), -math.inf)
    expected = every.topk(7, dim=-1)
    assert torch.equal(slots.sort(-1).values, expected.indices.sort(-1).values)
    assert torch.allclose(scores.sort(-1).values, expected.values.sort(-1).values, atol=1e-5)
    assert not is_padding(slots // n, slots % n, n, n * n - neurons).any()


def test_bfloat16_retrieval_follows_its_weights_when_they_change():
    """Outside autograd a narrow block searches with float32 copies of its queries and sub-keys, kept
    between calls; a weight written in place or replaced is searched with its new values."""
    peer = block(64, heads=2, topk=4).to(torch.bfloat16).eval()
    x = torch.randn(9, 16, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)

    def fresh() -> tuple[torch.Tensor, torch.Tensor]:  # with autograd on, nothing is kept
        with torch.enable_grad():
            slots, scores = peer.retrieve(x)
        return slots, scores.detach()

    with torch.no_grad():
        first = peer.retrieve(x)
        assert all(torch.equal(a, b) for a, b in zip(first, fresh()))
        torch.nn.init.normal_(peer.query.weight)  # in place
        peer.sub_keys.data = torch.randn_like(peer.sub_keys)  # replaced
        second = peer.retrieve(x)
    assert not torch.equal(first[1], second[1])
    assert all(torch.equal(a, b) for a, b in zip(second, fresh()))


def test_padding_lies_at_most_two_to_a_row_or_column():
    for neurons in range(2, 300):
        n = grid_side(neurons)
        grid = torch.arange(n * n)
        padding = is_padding(grid // n, grid % n, n, n * n - neurons).view(n, n)
        assert padding.sum() == n * n - neurons
        assert padding.sum(0).max() <= 2 and padding.sum(1).max() <= 2
        assert len(valid_slots(neurons)) == neurons


# ---------------------------------------------------------------------------- training


def test_a_training_step_reaches_queries_sub_keys_and_only_the_retrieved_rows():
    peer = block(100, heads=2, topk=3, scoring="unit").train()
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        used = peer.retrieve(x)[0].unique()
    loss = peer(x).square().mean()
    loss.backward()
    assert torch.isfinite(loss)
    for rows in (peer.gate_rows, peer.up_rows, peer.down_rows):
        touched = rows.grad.abs().sum(1).nonzero().squeeze(1)
        assert set(touched.tolist()) <= set(used.tolist()) and len(touched) > 0
    assert peer.query.weight.grad.abs().sum() > 0 and peer.sub_keys.grad.abs().sum() > 0
    assert len(used) < 100


def test_a_converted_model_trains(tmp_path: Path):
    source = add_char_tokenizer(make_tiny("llama", tmp_path / "llama"))
    out = tmp_path / "peer"
    assert run_cli("peer", source, "--topk", "16", "--query-norm", "--calibration", CALIBRATION,
                   "--calibration-tokens", "512", "--output", out) == 0
    model = load(out).train()
    loss = model(TOKENS, labels=TOKENS).loss
    loss.backward()
    peer = model.model.layers[1].mlp
    assert torch.isfinite(loss) and peer.sub_keys.grad.abs().sum() > 0 and peer.query.weight.grad.abs().sum() > 0
    rows_with_grad = peer.up_rows.grad.abs().sum(1).count_nonzero()
    assert 0 < rows_with_grad < peer.up_rows.shape[0]


def test_unit_weights_count_a_neuron_found_by_two_heads_once():
    peer = block(64, heads=2, topk=64, scoring="unit").eval()  # both heads find every neuron
    x = torch.randn(3, 16)
    with torch.no_grad():
        dense = (torch.nn.functional.silu(x @ peer.gate_rows.T) * (x @ peer.up_rows.T)) @ peer.down_rows
        assert torch.allclose(peer(x), dense, atol=1e-5)


# ---------------------------------------------------------------------------- calibrated retrieval


def test_placement_fits_better_than_a_random_grid():
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(2, 8, 6, generator=gen)  # points that truly are row + column vectors, plus noise
    n = 8
    truth = torch.randperm(64, generator=gen)[:60]
    z = centres[0][truth // n] + centres[1][truth % n] + 0.05 * torch.randn(60, 6, generator=gen)
    slots = place(z, n, torch.Generator().manual_seed(1))
    assert len(set(slots.tolist())) == 60 and set(slots.tolist()) <= set(valid_slots(60).tolist())

    def error(slots: torch.Tensor) -> float:
        a, b = additive_fit(z, slots // n, slots % n, n)
        return float((z - a[slots // n] - b[slots % n]).square().sum() / z.square().sum())

    random = valid_slots(60)[torch.randperm(60, generator=gen)]
    assert error(slots) < 0.5 * error(random)


def ffn_inputs(model, text: str, tokens: int = 256) -> dict[int, torch.Tensor]:
    """Each PEER block's inputs (T, H) when the model reads the first `tokens` characters of text."""
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(model.name_or_path)(text[:tokens], return_tensors="pt")["input_ids"]
    seen, handles = {}, []
    for i, layer in enumerate(model.model.layers):
        handles.append(layer.mlp.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(i, a[0][0].detach())))
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    return seen


def test_calibrated_retrieval_finds_the_neurons_that_matter(tmp_path: Path):
    """On held-out text, the fitted retrieval finds far more of the oracle's neurons than chance does."""
    source = add_char_tokenizer(make_tiny("llama", tmp_path / "llama"))
    out = tmp_path / "peer"
    assert run_cli("peer", source, "--topk", "24", "--calibration", CALIBRATION, "--calibration-tokens", "2048",
                   "--output", out) == 0
    model = load(out)
    inputs = ffn_inputs(model, HELDOUT.read_text())
    fitted = [retrieval_recall(model.model.layers[i].mlp, x) for i, x in inputs.items()]
    for layer in model.model.layers:  # the same blocks with random retrieval
        torch.nn.init.normal_(layer.mlp.query.weight)
    chance = [retrieval_recall(model.model.layers[i].mlp, x) for i, x in inputs.items()]
    share = lambda counts: sum(f for f, _ in counts) / sum(w for _, w in counts)  # noqa: E731
    assert share(chance) < 0.4 and share(fitted) > max(0.45, share(chance) + 0.15), (share(fitted), share(chance))


# ---------------------------------------------------------------------------- rows retrieval


@pytest.mark.parametrize(("family", "heads_per_row"), [("llama", 2), ("gpt2", 1)])  # gated: one head per sign
def test_rows_retrieval_at_full_retrieval_is_the_dense_model(tmp_path: Path, family: str, heads_per_row: int):
    source = make_tiny(family, tmp_path / family)
    out = tmp_path / "peer"
    assert run_cli("peer", source, "--retrieval", "rows", "--output", out) == 0
    peer = json.loads((out / "config.json").read_text())["peer"]
    n = peer["num_sub_keys"]
    assert (peer["num_heads"], peer["key_dim"], peer["num_neurons_per_head"]) == (heads_per_row * n, 2 * n, n)
    assert (load(out)(TOKENS).logits - logits(source, TOKENS)).abs().max() < 1e-4


def test_rows_retrieval_scores_each_neuron_by_its_own_linear_score(tmp_path: Path):
    """Head (r, sign) retrieves the top-k of grid row r by sign * a_i u_i·x + b_i g_i·x, each neuron's own
    up and gate scores (a_i, b_i >= 0 its calibrated scales), plus the row's margin: on random inputs."""
    source = add_char_tokenizer(make_tiny("llama", tmp_path / "llama", intermediate_size=90))  # 10 padding slots
    out = tmp_path / "peer"
    assert run_cli("peer", source, "--retrieval", "rows", "--topk", "40", "--calibration", CALIBRATION,
                   "--calibration-tokens", "512", "--output", out) == 0
    peer = load(out).model.layers[1].mlp
    n, H = peer.n, peer.up_rows.shape[1]
    assert (peer.heads, peer.top_k, peer.half) == (2 * n, 2, n)
    x = torch.randn(32, H, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        slots, scores = peer.retrieve(x)
        columns = peer.query.weight.view(n, 2, 2, n, H)[:, :, 1]  # (row, sign, column, H): the column halves
        own = []  # each slot's up and gate score, scaled: (T, n²) each
        for part, rows in (((columns[:, 0] - columns[:, 1]) / 2, peer.up_rows),
                           ((columns[:, 0] + columns[:, 1]) / 2, peer.gate_rows)):
            scale = part.reshape(n * n, H).norm(dim=1) / rows.norm(dim=1).clamp_min(1e-12)
            assert torch.allclose(part.reshape(n * n, H), scale[:, None] * rows, atol=1e-6)  # parallel, >= 0
            own.append((x @ rows.T) * scale)
        margin = peer.sub_keys[0, 0, 0, 0].item()
    grid = torch.arange(n * n)
    padding = is_padding(grid // n, grid % n, n, n * n - 90).view(n, n)
    for head in range(2 * n):
        row, sign = head // 2, 1 - 2 * (head % 2)
        expected = (sign * own[0] + own[1])[:, row * n:(row + 1) * n].masked_fill(padding[row], -math.inf).topk(2, dim=-1)
        assert torch.equal(slots[:, head].sort(-1).values, (row * n + expected.indices).sort(-1).values)
        assert torch.allclose((scores[:, head] - margin).sort(-1).values, expected.values.sort(-1).values,
                              atol=1e-6 * margin)


# ---------------------------------------------------------------------------- config


def test_moe_checkpoints_have_no_peer_section_and_load_as_before(tiny_llama: Path, tmp_path: Path):
    out = tmp_path / "moe"
    assert run_cli("upcycle", tiny_llama, "--experts", "4", "--topk", "2", "--format", "remote", "--output", out) == 0
    config = json.loads((out / "config.json").read_text())
    assert config.get("peer") is None
    model = load(out)
    assert not any(type(m).__name__ == "PeerBlock" for m in model.modules())
    assert (model(TOKENS).logits - logits(tiny_llama, TOKENS)).abs().max() < 1e-4


@pytest.mark.parametrize(("field", "value", "message"), [
    ("num_neurons_per_head", 200, "peer.num_neurons_per_head must be an integer from 1 to num_neurons (96)"),
    ("num_heads", 0, "peer.num_heads must be an integer >= 1"),
    ("num_sub_keys", 12, "peer.num_sub_keys must be an integer 10, the smallest n"),
    ("key_dim", 7, "peer.key_dim must be an even integer"),
    ("scoring", "top", "peer.scoring must be one of"),
    ("peer_layers", [0, 5], "peer.peer_layers must list distinct layer indices from 0 to 1"),
    ("query_norm", "yes", "peer.query_norm must be true or false"),
])
def test_a_bad_peer_section_fails_on_loading_in_one_line(field: str, value, message: str):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        peer_section({"num_neurons": 96, field: value}, Base(96))


# ---------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(("args", "message"), [
    (("--topk", "97"), "--topk must be between 1 and the 96 routed neurons, or all (got 97)"),
    (("--topk", "some"), "--topk must be a whole number or all"),
    (("--heads", "0"), "--heads must be a whole number, at least 1 (got 0)"),
    (("--shared-neurons", "96"), "--shared-neurons (96) must leave some of the 96 neurons routed"),
    (("--topk", "90", "--shared-neurons", "8"), "--topk must be between 1 and the 88 routed neurons"),
    (("--key-dim", "5"), "--key-dim must be an even whole number >= 2"),
    (("--retrieval", "rows", "--heads", "2"), "--retrieval rows sets its own heads (one or two per grid row) and key size"),
    (("--retrieval", "rows", "--key-dim", "8"), "drop --heads and --key-dim"),
])
def test_bad_options_are_refused_in_one_line_and_nothing_is_written(tmp_path: Path, capsys, args, message: str):
    source = make_tiny("llama", tmp_path / "llama")
    out = tmp_path / "nested" / "peer"
    assert message in refused(capsys, "peer", source, "--output", out, *args)
    assert not (tmp_path / "nested").exists()


def test_a_family_without_a_known_ffn_layout_is_refused(tmp_path: Path, capsys):
    source = make_tiny("llama", tmp_path / "bert-like")
    config = json.loads((source / "config.json").read_text()) | {"model_type": "mamba"}
    (source / "config.json").write_text(json.dumps(config))
    out = tmp_path / "peer"
    line = refused(capsys, "peer", source, "--output", out)
    assert "mamba" in line and "llama" in line  # what is wrong, and what is supported
    assert not out.exists()


# ---------------------------------------------------------------------------- inspect and verify


@pytest.mark.parametrize("args", [("--heads", "2", "--topk", "4", "--query-norm"), ("--heads", "3", "--topk", "40"),
                                  ("--retrieval", "rows", "--topk", "24"), ("--retrieval", "rows")])
def test_the_recorded_active_parameters_are_inspects(tmp_path: Path, args: tuple[str, ...]):
    """A token uses heads x top-k neurons (at most all of them, never padding), and BatchNorm's running
    statistics are no parameters: the summary's active count is the one inspect derives from config.json."""
    from moeify.anatomy import describe

    source = add_char_tokenizer(make_tiny("llama", tmp_path / "llama"))
    out = tmp_path / "peer"
    assert run_cli("peer", source, *args, "--calibration", CALIBRATION, "--calibration-tokens", "256",
                   "--output", out) == 0
    record = json.loads((out / "moeify.json").read_text())
    anatomy = describe(json.loads((out / "config.json").read_text()))
    assert (record["total_params"], record["active_params"]) == (anatomy.total, anatomy.active)


def test_verify_reports_retrieval_recall_and_neurons_per_token(tmp_path: Path, capsys):
    """verify's PEER figures are retrieval_recall on the very FFN inputs the model sees, and its active
    parameters those inspect computes from config.json alone."""
    from transformers import AutoTokenizer

    from moeify.anatomy import describe

    source = add_char_tokenizer(make_tiny("llama", tmp_path / "llama"))
    out = tmp_path / "peer"
    assert run_cli("peer", source, "--heads", "2", "--topk", "4", "--shared-neurons", "2", "--calibration",
                   CALIBRATION, "--calibration-tokens", "512", "--output", out) == 0
    capsys.readouterr()
    assert run_cli("verify", source, out, "--text", HELDOUT, "--tokens", "128", "--json") == 0
    report = json.loads(capsys.readouterr().out)["converted"]
    model = load(out)
    ids = torch.tensor([AutoTokenizer.from_pretrained(source)(HELDOUT.read_text())["input_ids"][:128]])
    seen = {}
    hooks = [layer.mlp.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(i, a[0][0]))
             for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        model(ids)
    for hook in hooks:
        hook.remove()
    counts = {i: retrieval_recall(model.model.layers[i].mlp, x) for i, x in seen.items()}
    assert report["retrieval"]["layer_recall"] == pytest.approx({str(i): f / w for i, (f, w) in counts.items()})
    routed = sum(w for _, w in counts.values()) / (128 * len(counts))
    assert 4 < routed <= 8  # two heads of top-4: the union of their choices
    assert report["retrieval"]["neurons_per_token"] == pytest.approx(routed + 2)
    assert report["retrieval"]["neuron_share"] == pytest.approx((routed + 2) / 96)
    assert report["active_params"] == describe(json.loads((out / "config.json").read_text())).active
