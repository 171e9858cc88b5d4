"""`moeify verify`: exact conversions measure as exact, damaged ones do not, and expert load adds up."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from moeify import cli
from moeify import verify as checks
from moeify.conversion import convert
from moeify.errors import MoeifyError
from moeify.loading import load_model
from moeify.spec import Format, Spec
from tests.fixtures import make_tiny

TOKENS = 256  # the tiny llama's whole context: one chunk


def with_tokenizer(folder: Path, vocab_size: int = 211) -> Path:
    """Give a tiny model a real tokenizer: BPE trained on the built-in text, ids below vocab_size."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>", "<unk>"])
    tok.train_from_iterator([checks.load_text(None)], trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(folder)
    return folder


def trained(folder: Path, steps: int = 15) -> Path:
    """A few Adam steps on the text, so the model predicts it better than chance and damage shows."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = torch.tensor(tokenizer(checks.load_text(None))["input_ids"][:TOKENS])[None]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = model(ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return trained(with_tokenizer(make_tiny("llama", tmp_path_factory.mktemp("verify") / "llama")))


@pytest.fixture(scope="module")
def upcycled(source: Path) -> Path:
    out = source.parent / "mixtral"
    convert(source, out, Spec(experts=4, topk=2), source=str(source))
    return out


@pytest.fixture(scope="module")
def noisy(source: Path) -> Path:
    out = source.parent / "noisy"
    convert(source, out, Spec(experts=4, topk=2, noise=0.2), source=str(source))
    return out


def recorded(folder: Path) -> dict:
    return json.loads((folder / "moeify.json").read_text())


def assert_loads_are_shares(stats: checks.ModelStats, layers: list[int]) -> None:
    assert list(stats.load) == layers
    for share in stats.load.values():
        assert len(share) == stats.routing.experts
        assert sum(share) == pytest.approx(1.0, abs=1e-12)
        assert min(share) >= 0


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()  # only what the command itself prints
    try:
        cli.main(["verify", *map(str, args)])
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_upcycled_mixtral_measures_exact(source, upcycled):
    report = checks.verify(str(source), str(upcycled), checks.load_text(None), tokens=TOKENS)
    assert report.tokens == TOKENS and report.chunks == 1  # llama context 256 holds all of it
    assert report.max_logit_diff < 1e-4
    assert report.ppl_ratio == pytest.approx(1.0, abs=1e-5)
    assert report.top1_agreement == 1.0
    assert report.source.perplexity < 150  # trained: well below the 211 of a uniform guess
    assert report.source.routing is None and report.source.total_params == report.source.active_params
    assert report.converted.routing == checks.Routing(4, 2, 0)
    assert (report.converted.total_params, report.converted.active_params) == \
        (recorded(upcycled)["total_params"], recorded(upcycled)["active_params"])
    assert_loads_are_shares(report.converted, [0, 1, 2])


def test_chunks_follow_the_context(source, upcycled):
    report = checks.verify(str(source), str(upcycled), checks.load_text(None), tokens=600)
    assert report.chunks == 3 and report.tokens == 600  # 256 + 256 + 88
    assert report.max_logit_diff < 1e-4 and report.top1_agreement == 1.0


def test_load_counts_what_mixtral_routed(source, upcycled):
    """The hooks' counts equal the top-k of the router logits Mixtral itself reports."""
    ids = checks.token_ids(checks.load_text(None), AutoTokenizer.from_pretrained(source), 100)
    model = load_model(upcycled)
    routing = checks.routing_of(model.config.to_dict())
    with torch.no_grad(), checks.counting(checks.blocks(model), routing) as counts:
        router_logits = model(ids[None], output_router_logits=True).router_logits
    assert len(router_logits) == 3
    for layer, logits in enumerate(router_logits):
        expected = torch.bincount(logits.topk(2, dim=-1).indices.reshape(-1), minlength=4)
        assert torch.equal(counts[layer], expected)
        assert int(expected.sum()) == 100 * 2


def test_noise_raises_the_ratio_and_fails_the_limit(source, noisy, capsys):
    report = checks.verify(str(source), str(noisy), checks.load_text(None), tokens=TOKENS)
    assert report.ppl_ratio > 1.01
    assert report.top1_agreement < 1.0 and report.max_logit_diff > 0.1

    code, out, err = run_cli(capsys, source, noisy, "--tokens", TOKENS, "--max-ppl-ratio", "1.0001")
    assert code == 1
    assert f"perplexity ratio {report.ppl_ratio:.4f} exceeds the limit 1.0001" in err
    assert "perplexity ratio" in out and "top-1 agreement" in out  # the tables, on stdout


def test_moe_to_moe_reports_both_loads(upcycled, noisy):
    report = checks.verify(str(upcycled), str(noisy), checks.load_text(None), tokens=64)
    assert report.ppl_ratio > 1.0
    assert_loads_are_shares(report.source, [0, 1, 2])
    assert_loads_are_shares(report.converted, [0, 1, 2])


def test_cli_json_and_plot(source, upcycled, capsys, tmp_path):
    png = tmp_path / "plots" / "load.png"
    code, out, err = run_cli(capsys, source, upcycled, "--tokens", 64, "--max-ppl-ratio", "1.0001",
                             "--plot", png, "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["passed"] is True and data["ppl_ratio"] == pytest.approx(1.0, abs=1e-5)
    assert data["tokens"] == 64 and data["top1_agreement"] == 1.0
    assert sorted(data["converted"]["load"]) == ["0", "1", "2"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_remote_format_with_shared_expert(source):
    out = source.parent / "remote"
    convert(source, out, Spec(experts=4, topk=1, shared_experts=1, format=Format.REMOTE), source=str(source))
    report = checks.verify(str(source), str(out), checks.load_text(None), tokens=128)
    assert report.max_logit_diff < 1e-4 and report.top1_agreement == 1.0
    assert report.converted.routing == checks.Routing(4, 1, 1)
    assert report.converted.active_params == recorded(out)["active_params"]
    assert_loads_are_shares(report.converted, [0, 1, 2])


def test_qwen2_moe_on_some_layers(tmp_path):
    dense = with_tokenizer(make_tiny("qwen2", tmp_path / "qwen2"))
    out = tmp_path / "qwen2-moe"
    result = convert(dense, out, Spec(experts=4, topk=2, shared_experts=1, moe_layers="1"), source=str(dense))
    assert result.target == "qwen2_moe"
    report = checks.verify(str(dense), str(out), checks.load_text(None), tokens=200)
    assert report.chunks == 2  # context 128
    assert report.max_logit_diff < 1e-4 and report.top1_agreement == 1.0
    assert report.converted.active_params == result.active_params
    assert_loads_are_shares(report.converted, [1])


def test_mismatched_vocab_is_one_error_line(source, tmp_path, capsys):
    other = with_tokenizer(make_tiny("llama", tmp_path / "other", vocab_size=250), vocab_size=250)
    code, out, err = run_cli(capsys, source, other)
    assert code == 2
    lines = err.strip().splitlines()
    assert lines == [("error: the converted model is not a conversion of the source: its vocabulary size is 250, "
                      "the source's 211; pass SOURCE first, then the model converted from it")]


def test_different_tokenizers_are_refused(source, tmp_path):
    other = make_tiny("llama", tmp_path / "other")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.train_from_iterator(["a completely different corpus of words " * 50],
                            trainers.BpeTrainer(vocab_size=60, special_tokens=["<unk>"]))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(other)
    with pytest.raises(MoeifyError, match="different vocabularies"):
        checks.verify(str(source), str(other), checks.load_text(None), tokens=32)


@pytest.mark.parametrize("args, message", [
    (["--text", "missing.txt"], "text file missing.txt does not exist"),
    (["--tokens", "1"], "--tokens must be between 2 and 1048576 (got 1)"),
    (["--tokens", "1048577"], "--tokens must be between 2 and 1048576 (got 1048577)"),
])
def test_bad_input_is_one_error_line(source, upcycled, capsys, monkeypatch, tmp_path, args, message):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(capsys, source, upcycled, *args)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"error: {message}")


def test_empty_text_file(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(MoeifyError, match="is empty"):
        checks.load_text(empty)


def test_plot_without_experts_is_refused(source, tmp_path):
    report = checks.verify(str(source), str(source), checks.load_text(None), tokens=16)
    assert report.ppl_ratio == 1.0 and report.max_logit_diff == 0.0
    with pytest.raises(MoeifyError, match="no expert load to plot"):
        checks.plot(report, tmp_path / "x.png")


# ---------------------------------------------------------------------------- layer by layer


def whole_model(source: Path, converted: Path, tokens: int) -> dict:
    """The reference: both models whole in memory, logits of the same chunks compared directly."""
    ids = checks.token_ids(checks.load_text(None), AutoTokenizer.from_pretrained(source), tokens)
    models = [load_model(folder) for folder in (source, converted)]
    context = checks.context_of(*(m.config.to_dict() for m in models))
    nll, diffs, agree = [0.0, 0.0], [], 0
    with torch.no_grad():
        for chunk in checks.chunked(ids, context):
            a, b = (m(chunk[None]).logits[0].float() for m in models)
            for i, out in enumerate((a, b)):
                nll[i] += torch.nn.functional.cross_entropy(out[:-1], chunk[1:], reduction="sum").item()
            diffs.append((b - a).abs().flatten())
            agree += int((a.argmax(-1) == b.argmax(-1)).sum())
    predicted = ids.numel() - len(checks.chunked(ids, context))
    diff = torch.cat(diffs)
    return {"ppl": [math.exp(n / predicted) for n in nll], "max": diff.max().item(), "mean": diff.mean().item(),
            "agreement": agree / ids.numel()}


@pytest.mark.parametrize("family", ["llama", "gpt2", "phi3"])
def test_layer_by_layer_equals_the_whole_models(family, tmp_path):
    dense = with_tokenizer(make_tiny(family, tmp_path / family))
    noisy = tmp_path / "noisy"
    convert(dense, noisy, Spec(experts=4, topk=2, noise=0.3), source=str(dense))
    tokens = 150 if family != "gpt2" else 100  # gpt2's context is 64: two chunks
    report = checks.verify(str(dense), str(noisy), checks.load_text(None), tokens=tokens)
    expected = whole_model(dense, noisy, tokens)
    assert report.max_logit_diff > 0.01  # damaged: the figures below mean something
    assert [report.source.perplexity, report.converted.perplexity] == pytest.approx(expected["ppl"], rel=1e-5)
    assert report.max_logit_diff == pytest.approx(expected["max"], rel=1e-4)
    assert report.mean_logit_diff == pytest.approx(expected["mean"], rel=1e-4)
    assert report.top1_agreement == expected["agreement"]


def test_one_layer_at_a_time(source, upcycled, monkeypatch):
    """While verify runs, at most one decoder layer of each model holds real weights."""
    from moeify import layerwise

    seen = []
    step = layerwise.LayerwiseModel.step

    def watched(layer, index, states):
        for runner in runners:
            real = [i for i, module in enumerate(runner.layers) if any(not p.is_meta for p in module.parameters())]
            seen.append(real)
        return step(layer, index, states)

    runners = []
    init = layerwise.LayerwiseModel.__init__
    monkeypatch.setattr(layerwise.LayerwiseModel, "__init__",
                        lambda self, *a, **k: (init(self, *a, **k), runners.append(self))[0])
    monkeypatch.setattr(layerwise.LayerwiseModel, "step", staticmethod(watched))
    checks.verify(str(source), str(upcycled), checks.load_text(None), tokens=64)
    assert len(runners) == 2 and len(seen) == 2 * 2 * 3  # 2 models x 3 layers, both models looked at each time
    assert all(len(real) <= 1 for real in seen) and sum(map(len, seen)) == 6
    assert all(p.is_meta for runner in runners for p in runner.model.parameters())  # all dropped at the end


@pytest.mark.parametrize("change, message", [
    ({"hidden_size": 32, "head_dim": 8}, "its hidden size is 32, the source's 64"),
    ({"num_hidden_layers": 2}, "its layer count is 2, the source's 3"),
])
def test_a_model_of_another_lineage_is_refused(source, tmp_path, capsys, change, message):
    other = with_tokenizer(make_tiny("llama", tmp_path / "other", **change))
    code, out, err = run_cli(capsys, source, other)
    assert code == 2 and out == ""
    assert err.strip().splitlines() == [(f"error: the converted model is not a conversion of the source: {message}; "
                                         f"pass SOURCE first, then the model converted from it")]


def test_another_family_is_refused_but_a_native_moe_is_not(tmp_path):
    qwen2 = make_tiny("qwen2", tmp_path / "qwen2", hidden_size=64, num_hidden_layers=3)
    with pytest.raises(MoeifyError, match="it is a qwen2 model, the source a llama"):
        checks.check_lineage(checks.read_config(make_tiny("llama", tmp_path / "llama")), checks.read_config(qwen2))
    checks.check_lineage({"model_type": "qwen2", "hidden_size": 8}, {"model_type": "mixtral", "hidden_size": 8})
    checks.check_lineage({"model_type": "gpt2", "n_embd": 8},
                         {"model_type": "moeify", "hidden_size": 8, "base_config": {"model_type": "gpt2"}})


def test_a_short_text_is_said_and_logs_stay_quiet(source, upcycled, tmp_path, capsys):
    text = tmp_path / "short.txt"
    text.write_text("A few words only, far fewer than asked for.")
    code, out, err = run_cli(capsys, source, upcycled, "--text", text, "--tokens", 500)
    assert code == 0, err
    assert out.count("verify on") == 1  # the table's title
    assert "fewer than --tokens 500: verifying on" in err
    assert "Loading weights" not in err and "attention mask" not in err
