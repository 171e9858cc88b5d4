"""moeify split (and granular upcycling): exactness, partial sums, virtual groups, calibration, errors.

Tiny models for everything but two tests on the real SmolLM2-135M.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
from typer.testing import CliRunner

from moeify import calibration
from moeify.cli import app
from moeify.errors import MoeifyError
from moeify.spec import Spec
from moeify.transforms import FFN, upcycle
from tests.fixtures import logits, make_tiny, run_cli

CALIBRATION = Path(__file__).parents[1] / "benchmarks" / "data" / "calibration.txt"
HELDOUT = Path(__file__).parents[1] / "benchmarks" / "data" / "heldout.txt"
TOKENS = torch.randint(3, 200, (2, 24), generator=torch.Generator().manual_seed(0))


def add_char_tokenizer(folder: Path) -> Path:
    """One token per printable character: calibration needs a tokenizer, the tiny models have none."""
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {c: i + 3 for i, c in enumerate(chars)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(folder)
    return folder


@pytest.fixture
def llama(tmp_path: Path) -> Path:
    return add_char_tokenizer(make_tiny("llama", tmp_path / "tiny-llama"))


def run(*args: object) -> None:
    """The CLI as a user runs it, expecting success."""
    assert run_cli(*args) == 0, f"moeify {' '.join(map(str, args))} failed"


def refused(capsys, *args: object) -> str:
    """Run the CLI expecting exit code 2; return its one error line."""
    capsys.readouterr()  # forget what earlier commands printed
    assert run_cli(*args) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def split(source: Path, out: Path, *options: str) -> dict:
    run("split", source, "--output", out, "--calibration", CALIBRATION, "--calibration-tokens", 1024, *options)
    return json.loads((out / "config.json").read_text())


# ---------------------------------------------------------------------------- dense sources


@pytest.mark.parametrize("partition,shared", [("contiguous", 0), ("random", 0), ("cluster", 0), ("activation", 0),
                                              ("activation", 1), ("random", 2)])
def test_dense_split_with_every_piece_selected_is_exact(llama, tmp_path, partition, shared):
    config = split(llama, tmp_path / "out", "--granularity", 4, "--shared-experts", shared, "--partition", partition)
    moe = config["moe"]
    assert (moe["scoring"], moe["num_experts"], moe["num_shared_experts"]) == ("unit", 4 - shared, shared)
    assert moe["expert_intermediate_size"] == moe["shared_intermediate_size"] == 96 // 4
    got = logits(tmp_path / "out", TOKENS, trust_remote_code=True)
    assert (got - logits(llama, TOKENS)).abs().max() < 1e-5
    record = json.loads((tmp_path / "out" / "moeify.json").read_text())
    assert (record["mode"], record["partition"], record["topk"]) == ("split", partition, 4 - shared)


@pytest.mark.parametrize("router", ["fit", "centroid", "representative"])
def test_fewer_pieces_give_the_partial_sum_of_the_chosen_ones(llama, tmp_path, router):
    out = tmp_path / "out"
    split(llama, out, "--granularity", 4, "--shared-experts", 1, "--topk", 1, "--router-init", router)
    weights = load_file(out / "model.safetensors")
    dense = load_file(llama / "model.safetensors")
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32)
    x = torch.randn(1, 7, 64, generator=torch.Generator().manual_seed(1))
    for layer in range(3):
        base = f"model.layers.{layer}.mlp"
        expert = lambda name: FFN(gate=weights[f"{base}.{name}.gate_proj.weight"],  # noqa: E731
                                  up=weights[f"{base}.{name}.up_proj.weight"], down=weights[f"{base}.{name}.down_proj.weight"])
        chosen = (x @ weights[f"{base}.router.weight"].T).argmax(-1)  # top-1 routed piece per token
        expected = _ffn(expert("shared_experts.0"), x)
        for j in range(3):
            expected = expected + (chosen == j)[..., None] * _ffn(expert(f"experts.{j}"), x)
        with torch.no_grad():
            assert torch.allclose(model.model.layers[layer].mlp(x), expected, atol=1e-5)
        # The four pieces are a true partition of the dense FFN's neurons: same rows, each once.
        rows = torch.cat([weights[f"{base}.{name}.up_proj.weight"] for name in
                          ("shared_experts.0", "experts.0", "experts.1", "experts.2")])
        dense_rows = dense[f"{base}.up_proj.weight"]
        assert torch.equal(rows[_match(rows, dense_rows)], dense_rows)
        assert len(set(_match(rows, dense_rows).tolist())) == 96


def _ffn(ffn: FFN, x: torch.Tensor) -> torch.Tensor:
    return (torch.nn.functional.silu(x @ ffn.gate.T) * (x @ ffn.up.T)) @ ffn.down.T


def _match(rows: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """For each reference row, the index of the identical row in `rows`."""
    return torch.cdist(reference, rows).argmin(1)


def test_split_without_calibration_text_reads_the_built_in_corpus(llama, tmp_path, capsys):
    run("split", llama, "--output", tmp_path / "out", "--granularity", 4, "--topk", 2, "--calibration-tokens", 256)
    assert "sampl" not in capsys.readouterr().err
    assert json.loads((tmp_path / "out" / "config.json").read_text())["moe"]["num_experts_per_tok"] == 2
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in calibration.builtin_texts(256)))
    default, from_file = (calibration.collect(llama, _llama_adapter(), [1], text, 256, 0, coactivation=False)[1]
                          for text in (None, str(corpus)))
    assert default.tokens == 256 and torch.equal(default.xs, from_file.xs)


def test_built_in_corpus_mixes_prose_dialogue_and_code():
    texts = calibration.builtin_texts(400)  # 6400 characters: the first passage of each part, then more
    assert 6400 <= sum(map(len, texts)) < 6400 + 2 * calibration.PASSAGE + 2000
    assert "Emma" in texts[0] and texts[1].startswith('"') and texts[2].startswith("# textwrap.py")


def test_a_short_text_is_topped_up_from_the_built_in_corpus(llama, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Only a sentence or two of calibration text. " * 3)
    notes = []
    stats = calibration.collect(llama, _llama_adapter(), [0], str(short), 600, 0, coactivation=False,
                                notify=notes.append)
    assert stats[0].tokens == 600
    assert notes == ["the calibration text gave 132 of 600 tokens; the other 468 come from moeify's built-in corpus"]


def test_split_with_every_piece_active_skips_calibration(llama, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("calibration ran")

    monkeypatch.setattr(calibration, "collect", refuse)
    out = tmp_path / "all"
    run("split", llama, "--output", out, "--granularity", 4)  # no --topk: all 4 active
    assert json.loads((out / "config.json").read_text())["moe"]["num_experts_per_tok"] == 4
    assert (logits(out, TOKENS, trust_remote_code=True) - logits(llama, TOKENS)).abs().max() < 1e-5
    with pytest.raises(AssertionError, match="calibration ran"):  # one routed piece fewer: calibration is needed
        run_cli("split", llama, "--output", tmp_path / "top3", "--granularity", 4, "--topk", 3)


def test_split_help_runs():
    result = CliRunner().invoke(app, ["split", "--help"])
    assert result.exit_code == 0 and "--partition" in result.output and "--router-init" in result.output


# ---------------------------------------------------------------------------- MoE sources


def test_mixtral_split_stays_native_mixtral_and_exact(llama, tmp_path):
    mixtral = tmp_path / "mixtral"
    run("upcycle", llama, "--experts", 4, "--topk", 2, "--noise", 0.05, "--router-std", 0.5, "--output", mixtral)
    config = split(mixtral, tmp_path / "finer", "--granularity", 3)
    assert (config["model_type"], config["num_local_experts"], config["num_experts_per_tok"]) == ("mixtral", 12, 6)
    assert config["intermediate_size"] == 96 // 3
    source_logits = logits(mixtral, TOKENS)
    assert (logits(tmp_path / "finer", TOKENS) - source_logits).abs().max() < 1e-5
    assert (source_logits - logits(llama, TOKENS)).abs().max() > 1e-3  # the noisy experts really differ


def test_mixtral_split_refuses_shared_experts(llama, tmp_path, capsys):
    run("upcycle", llama, "--experts", 2, "--topk", 1, "--output", tmp_path / "mixtral")
    line = refused(capsys, "split", tmp_path / "mixtral", "--granularity", 2, "--shared-experts", 1,
                   "--output", tmp_path / "out")
    assert "a MoE source keeps its own experts" in line
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------- granular upcycling


def test_virtual_groups_select_whole_groups():
    ffn = FFN(gate=torch.randn(12, 8), up=torch.randn(12, 8), down=torch.randn(8, 12))
    moe = upcycle(ffn, Spec(experts=4, topk=2, granularity=3, router_std=1.0), layer=0)
    assert torch.equal(moe.router, moe.router[::3].repeat_interleave(3, dim=0))  # one row per group of 3
    chosen = (torch.randn(500, 8) @ moe.router.T).topk(moe.topk, dim=-1).indices  # (T, k·G)
    groups = (chosen // 3).sort(dim=-1).values
    assert torch.equal(groups, groups[:, ::3].repeat_interleave(3, dim=-1))  # each group chosen whole


@pytest.mark.parametrize("fmt", ["native", "remote"])
def test_granular_upcycling_is_exact(llama, tmp_path, fmt):
    out = tmp_path / "out"
    run("upcycle", llama, "--experts", 4, "--topk", 2, "--granularity", 3, "--router-std", 0.5, "--format", fmt,
        "--output", out)
    config = json.loads((out / "config.json").read_text())
    experts = config["num_local_experts"] if fmt == "native" else config["moe"]["num_experts"]
    assert experts == 12
    assert (logits(out, TOKENS, trust_remote_code=True) - logits(llama, TOKENS)).abs().max() < 1e-5


def test_granular_upcycling_refuses_g_not_dividing_i(llama, tmp_path, capsys):
    line = refused(capsys, "upcycle", llama, "--experts", 4, "--granularity", 5, "--output", tmp_path / "out")
    assert "--granularity 5 does not divide the intermediate size 96" in line
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("options,message", [
    (["--granularity", "5"], "--granularity 5 does not divide the intermediate size 96"),
    (["--granularity", "4", "--topk", "5"], "--topk must be between 1 and the 4 routed experts"),
    (["--granularity", "4", "--shared-experts", "1", "--topk", "4"], "--topk must be between 1 and the 3 routed"),
    (["--granularity", "1"], "--granularity must be at least 2"),
    (["--granularity", "4", "--calibration", "missing.txt"], "--calibration missing.txt does not exist"),
])
def test_bad_split_input_is_one_line_exit_2_and_nothing_written(llama, tmp_path, capsys, monkeypatch, options, message):
    monkeypatch.chdir(tmp_path)
    line = refused(capsys, "split", llama, "--output", tmp_path / "out", *options)
    assert message in line
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


@pytest.mark.parametrize("name,content", [("empty.txt", "  \n"), ("empty.jsonl", "\n")])
def test_empty_calibration_file_is_refused(llama, tmp_path, capsys, name, content):
    (tmp_path / name).write_text(content)
    line = refused(capsys, "split", llama, "--granularity", 4, "--calibration", tmp_path / name,
                   "--output", tmp_path / "out")
    assert f"calibration file {tmp_path / name} is empty" in line
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------- calibration


def test_calibration_reads_plain_text_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("One paragraph.\n\nAnother one.")
    (tmp_path / "b.jsonl").write_text('{"text": "first"}\n\n{"text": "second", "id": 2}\n')
    assert calibration.read_texts(str(tmp_path / "a.txt")) == ["One paragraph.\n\nAnother one."]
    assert calibration.read_texts(str(tmp_path / "b.jsonl")) == ["first", "second"]
    (tmp_path / "c.jsonl").write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(MoeifyError, match="line 2 is not a JSON object"):
        calibration.read_texts(str(tmp_path / "c.jsonl"))


def test_a_dataset_name_without_datasets_installed_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # importing it raises ImportError, as when absent
    with pytest.raises(MoeifyError, match=r"wikitext:wikitext-2-raw-v1 needs the `datasets` package: pip install"):
        calibration.read_texts("wikitext:wikitext-2-raw-v1")


def test_a_hub_dataset_is_read_once_by_split_and_peer(llama, tmp_path, monkeypatch):
    """The up-front check only names a stream's kind; the calibration pass alone reads it (a Hub
    dataset, stood in for: no network here)."""
    import datasets

    calls = []

    def load_dataset(*args, **kwargs):
        calls.append(args)
        return iter([{"text": "The calibration text of a streamed dataset, row %d. " % i * 4} for i in range(50)])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    run("split", llama, "--output", tmp_path / "split", "--granularity", 4, "--topk", 2,
        "--calibration", "someone/web-text", "--calibration-tokens", 256)
    assert calls == [("someone/web-text", None)]
    run("peer", llama, "--output", tmp_path / "peer", "--topk", 48, "--calibration", "someone/web-text",
        "--calibration-tokens", 256)
    assert len(calls) == 2


def test_statistics_stream_batch_by_batch_as_if_all_at_once():
    x, c = torch.randn(40, 6), torch.rand(40, 20)
    whole, parts = calibration.LayerStats(6, 20, True), calibration.LayerStats(6, 20, True)
    whole.update(x, c)
    for xs, cs in zip(x.split(7), c.split(7)):
        parts.update(xs, cs)
    assert whole.tokens == parts.tokens == 40
    for name in ("mass", "hot", "xx", "xs", "cc"):
        assert torch.allclose(getattr(whole, name), getattr(parts, name), atol=1e-5), name


def test_calibration_uses_the_file_and_never_more_than_the_budget(llama):
    stats = calibration.collect(llama, _llama_adapter(), [0, 2], str(CALIBRATION), 700, 0, coactivation=True)
    assert set(stats) == {0, 2} and stats[0].tokens == 700
    assert stats[0].hot.sum() == 700 * int(calibration.HOT_SHARE * 96)
    assert stats[0].cc.shape == (96, 96)


def test_layers_after_the_last_chosen_one_are_never_read(llama, monkeypatch):
    from moeify import layerwise

    loaded, progress = [], []
    original = layerwise.LayerwiseModel.loaded
    monkeypatch.setattr(layerwise.LayerwiseModel, "loaded", lambda self, i: (loaded.append(i), original(self, i))[1])
    stats = calibration.collect(llama, _llama_adapter(), [0, 1], str(CALIBRATION), 300, 0, coactivation=True,
                                on_progress=lambda done, total: progress.append((done, total)),
                                reduce=lambda layer, stats: (layer, stats.tokens))
    assert stats == {0: (0, 300), 1: (1, 300)}
    assert loaded == [0, 1] and progress == [(1, 2), (2, 2)]  # layer 2 of 3 is not needed


def _llama_adapter():
    from moeify.adapters import ADAPTERS

    return ADAPTERS["llama"]


# ---------------------------------------------------------------------------- the real SmolLM2-135M


def test_smollm2_split_8_top_8_is_exact(smollm2, tmp_path):
    out = tmp_path / "split"
    split(smollm2, out, "--granularity", 8, "--shared-experts", 1, "--partition", "activation",
          "--calibration-tokens", 256)  # few tokens: exactness does not depend on them
    tokens = torch.tensor([[1, 504, 3458, 282, 253, 1345, 30, 378, 2379, 9031, 314, 253, 1092, 28, 907, 30]])
    # Eight partial sums in another order than the dense matmul: float32 rounding, relative to logits of ~20.
    dense = logits(smollm2, tokens)
    assert (logits(out, tokens, trust_remote_code=True) - dense).abs().max() < 1e-5 * dense.abs().max()


def test_smollm2_mixtral_split_g2_is_exact(smollm2, tmp_path):
    mixtral, finer = tmp_path / "mixtral", tmp_path / "finer"
    run("upcycle", smollm2, "--experts", 2, "--topk", 1, "--noise", 0.01, "--dtype", "bfloat16",
        "--output", mixtral)
    run("split", mixtral, "--granularity", 2, "--output", finer)
    assert json.loads((finer / "config.json").read_text())["num_local_experts"] == 4
    tokens = torch.tensor([[1, 504, 3458, 282, 253, 1345, 30, 378, 2379, 9031, 314, 253, 1092, 28, 907, 30]])
    assert (logits(finer, tokens) - logits(mixtral, tokens)).abs().max() < 1e-4
