"""moeify merge: experts from fine-tunes of one base, in every output format, with prompt-learnt gates."""

from __future__ import annotations

import json
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from moeify import gates
from moeify.adapters import adapter_for
from moeify.checkpoint import Checkpoint
from moeify.errors import MoeifyError
from moeify.merge import ExpertSource
from moeify.spec import Gate, Spec
from tests.fixtures import logits, make_tiny, run_cli
from tests.test_cli_errors import assert_one_line_error, leftovers
from tests.test_split import add_char_tokenizer

# Three kinds of text a character-level tokenizer tells apart; the held-out prompts are not in the files.
KINDS = {
    "digits": (["12345 67890 2468", "3141 5926 5358 979", "2718 2818 2845 90", "1 22 333 4444 55555"],
               ["8080 443 22 21", "99 1000 777 31337"]),
    "words": (["hello there my friend", "the quick brown fox jumps", "lorem ipsum dolor sit", "over the lazy dog"],
              ["good morning to you", "jumps over the fence"]),
    "shout": (["HELLO THERE!!", "WHAT IS THIS?!", "STOP. NOW. PLEASE!", "GO AWAY, YOU!"],
              ["YES! NO? MAYBE.", "ALL CAPS, ALWAYS!"]),
}
TOKENS = torch.randint(3, 90, (2, 12), generator=torch.Generator().manual_seed(1))


@dataclass
class Models:
    root: Path
    base: Path
    tunes: dict[str, Path]  # kind -> the base with its FFNs perturbed
    prompts: dict[str, Path]  # kind -> a text file of its training prompts


def fine_tune(base: Path, folder: Path, seed: int, std: float = 0.05) -> Path:
    """The base with every FFN weight perturbed: a stand-in for a fine-tune that changed its FFNs."""
    shutil.copytree(base, folder)
    tensors = load_file(folder / "model.safetensors")
    gen = torch.Generator().manual_seed(seed)
    tensors = {name: t + torch.randn(t.shape, generator=gen) * std if ".mlp." in name else t
               for name, t in tensors.items()}
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def build_models(root: Path) -> Models:
    """A tiny Llama with a character tokenizer, a fine-tune of it per kind of text, and each kind's prompt file."""
    base = add_char_tokenizer(make_tiny("llama", root / "base"))
    tunes = {kind: fine_tune(base, root / kind, seed) for seed, kind in enumerate(KINDS, start=1)}
    prompts = {}
    for kind, (train, _) in KINDS.items():
        prompts[kind] = root / f"{kind}.txt"
        prompts[kind].write_text("\n".join(train) + "\n")
    return Models(root, base, tunes, prompts)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Models:
    return build_models(tmp_path_factory.mktemp("merge"))


def merge(models: Models, output: Path, *args: object, kinds=("digits", "words")) -> int:
    experts = [a for kind in kinds for a in ("--expert", f"{models.tunes[kind]}:{models.prompts[kind]}")]
    return run_cli("merge", models.base, *experts, "--output", output, *args)


def ffn(folder: Path, layer: int) -> dict[str, torch.Tensor]:
    ckpt = Checkpoint(folder)
    return {p: ckpt.read(f"model.layers.{layer}.mlp.{p}_proj.weight") for p in ("gate", "up", "down")}


def loads_cleanly(folder: Path, remote: bool = False):
    model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, trust_remote_code=remote,
                                                       output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model


EXPERT_NAMES = {  # format -> (expert tensor name of (layer, j, projection), shared experts, extra args)
    "mixtral": (lambda i, j, p: f"model.layers.{i}.block_sparse_moe.experts.{j}.{ {'gate': 'w1', 'up': 'w3', 'down': 'w2'}[p] }.weight",
                (), ("--format", "native")),
    "qwen2_moe": (lambda i, j, p: f"model.layers.{i}.mlp.experts.{j}.{p}_proj.weight",
                  ("base",), ("--format", "native")),
    "remote": (lambda i, j, p: f"model.layers.{i}.mlp.experts.{j}.{p}_proj.weight", ("base",),
               ("--format", "remote")),
}


@pytest.mark.parametrize("gate", ["random", "hidden"])  # hidden: the routers are written last
@pytest.mark.parametrize("target", list(EXPERT_NAMES))
def test_merged_experts_are_their_sources_ffns(models: Models, tmp_path: Path, target: str, gate: str):
    name, shared, args = EXPERT_NAMES[target]
    out = tmp_path / "out"
    shared_args = [a for s in shared for a in ("--shared", models.base)]
    assert merge(models, out, "--gate", gate, *shared_args, *args) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == ("moeify" if target == "remote" else target)
    loads_cleanly(out, remote=target == "remote")
    merged, base = Checkpoint(out), Checkpoint(models.base)
    share = 1 / (len(shared) + 1)  # routed and shared outputs are weighted 1/(S+1) each
    for layer in range(3):
        for j, kind in enumerate(("digits", "words")):
            source = ffn(models.tunes[kind], layer)
            for proj in ("gate", "up"):
                assert torch.equal(merged.read(name(layer, j, proj)), source[proj])
            torch.testing.assert_close(merged.read(name(layer, j, "down")), source["down"] * share, rtol=0, atol=0)
    ffn_names = {n for n in base.names() if ".mlp." in n}
    for tensor in base.names():
        if tensor not in ffn_names:
            assert torch.equal(merged.read(tensor), base.read(tensor)), tensor


@pytest.mark.parametrize("fmt", ["native", "remote"])
def test_merging_the_base_with_itself_computes_the_base(models: Models, tmp_path: Path, fmt: str):
    out = tmp_path / "out"
    args = ["--expert", models.base, "--expert", models.base, "--expert", models.base, "--shared", models.base]
    assert run_cli("merge", models.base, *args, "--topk", 2, "--format", fmt, "--output", out) == 0
    assert json.loads((out / "config.json").read_text())["model_type"] == ("qwen2_moe" if fmt == "native" else "moeify")
    torch.testing.assert_close(logits(out, TOKENS, trust_remote_code=fmt == "remote"), logits(models.base, TOKENS),
                               rtol=0, atol=1e-5)


def own_share(folder: Path, layers: int = 3) -> list[float]:
    """Per layer, the share of held-out prompt tokens (after the first) whose top-1 expert is their kind's."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    hits, total = torch.zeros(layers), 0
    for e, (_, heldout) in enumerate(KINDS.values()):
        for prompt in heldout:
            ids = torch.tensor(tokenizer(prompt)["input_ids"])[None]
            with torch.no_grad():
                routers = model(ids, output_router_logits=True).router_logits
            for layer, r in enumerate(routers):
                hits[layer] += int((r.reshape(ids.shape[1], -1)[1:].argmax(-1) == e).sum())
            total += ids.shape[1] - 1
    return (hits / total).tolist()


def test_hidden_gates_route_heldout_prompts_to_their_expert(models: Models, tmp_path: Path, capsys):
    out = tmp_path / "out"
    assert merge(models, out, "--gate", "hidden", "--topk", 1, kinds=tuple(KINDS)) == 0
    shares = own_share(out)
    # chance is 1/3; spaces appear in two kinds and a tiny random model's states are mostly the token's own
    assert min(shares) > 0.55 and sum(shares) / 3 > 0.6, shares
    report = json.loads((out / "moeify.json").read_text())["routing"]
    assert report["gate"] == "hidden" and len(report["top1_shares"]) == 3 and report["mean_own_share"] > 0.7
    shown = capsys.readouterr().out  # the routing report is a result: on stdout
    assert "routing (hidden gates)" in shown and "reach their own expert first" in shown


def test_cheap_embed_gates_share_one_row_across_layers(models: Models, tmp_path: Path):
    out = tmp_path / "out"
    assert merge(models, out, "--gate", "cheap-embed", kinds=tuple(KINDS)) == 0
    ckpt = Checkpoint(out)
    rows = [ckpt.read(f"model.layers.{i}.block_sparse_moe.gate.weight") for i in range(3)]
    assert torch.equal(rows[0], rows[1]) and torch.equal(rows[0], rows[2]) and rows[0].abs().sum() > 0
    shares = own_share(out)
    assert sum(shares) / 3 > 0.4, shares  # weaker than hidden gates, still above chance (1/3) on held-out text


def test_a_merge_replays_from_its_moeify_json(models: Models, tmp_path: Path):
    assert merge(models, tmp_path / "a", "--gate", "hidden", "--granularity", 2, "--noise", 0.01) == 0
    record = json.loads((tmp_path / "a" / "moeify.json").read_text())
    assert record["source"] == "base"  # a local folder is recorded by name: a replay names it again
    assert run_cli("apply", tmp_path / "a" / "moeify.json", models.base, "--output", tmp_path / "b") == 0
    first, again = Checkpoint(tmp_path / "a"), Checkpoint(tmp_path / "b")
    assert first.names() == again.names() and len(first.names()) > 30
    for tensor in first.names():
        assert torch.equal(first.read(tensor), again.read(tensor)), tensor


# ---------------------------------------------------------------------------- gates against the whole model


PROMPTS = [ExpertSource(kind, positive=tuple(train), negative=tuple(heldout)) for kind, (train, heldout) in KINDS.items()]


def whole_model_rows(folder: Path, gate: Gate, layers: list[int]) -> dict[int, torch.Tensor]:
    """The reference: the base whole in memory, each prompt run alone, hooks on the MoE layers' FFNs."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    adapter = adapter_for(Checkpoint(folder).config)
    batch = gates.PromptBatch.of(AutoTokenizer.from_pretrained(folder), PROMPTS)
    if gate is Gate.CHEAP_EMBED:
        x = model.get_input_embeddings().weight[batch.ids].detach()
        x = x / x.pow(2).mean(-1, keepdim=True).sqrt()
        return {i: gates.fit_rows(batch, x)[0] for i in layers}
    x = {i: torch.zeros(*batch.ids.shape, model.config.hidden_size) for i in layers}
    for b, length in enumerate(batch.real.sum(1).tolist()):
        handles = [model.get_submodule(adapter.mlp_path(i)).register_forward_pre_hook(
            lambda m, args, i=i, b=b, length=length: x[i][b, :length].copy_(args[0][0])) for i in layers]
        with torch.no_grad():
            model(batch.ids[b:b + 1, :length])
        for handle in handles:
            handle.remove()
    return {i: gates.fit_rows(batch, x[i])[0] for i in layers}


def test_a_yaml_boolean_key_names_no_expert(tmp_path: Path):
    """`true:` is a YAML boolean, equal to 1: it must not give its prompts to expert 1."""
    from moeify.merge import apply_prompt_file

    (tmp_path / "p.yaml").write_text("true:\n  positive: [hello]\n")
    with pytest.raises(MoeifyError, match="names expert True, which no --expert gives"):
        apply_prompt_file([ExpertSource("a"), ExpertSource("b")], tmp_path / "p.yaml")


def test_expert_sources_that_are_not_a_list_are_refused():
    from moeify.merge import sources_of
    from moeify.spec import Mode

    with pytest.raises(MoeifyError, match="expert_sources must be a list"):
        sources_of(Spec(mode=Mode.MERGE, experts=2, topk=1, expert_sources="ab"))


def test_negative_prompts_for_some_experts_only_keep_every_expert_routed():
    """States share a large common part; an expert with negative prompts among experts without must still
    get its own tokens (its row, pos - neg, lacks that part, while the others' rows kept it)."""
    experts = [ExpertSource("a", positive=("a1", "a2"), negative=("b3",)),
               ExpertSource("b", positive=("b1", "b2")), ExpertSource("c", positive=("c1", "c2"))]
    batch = gates.PromptBatch.of(lambda text: {"input_ids": [1, 2, 3, 4]}, experts)
    gen = torch.Generator().manual_seed(0)
    kinds = torch.eye(16)[:3]
    common = torch.cat([torch.zeros(3), 10 * torch.randn(13, generator=gen)])  # large, apart from the kinds
    kind = {"a": 0, "b": 1, "c": 2}
    prompts = [p for e in experts for p in (*e.positive, *e.negative)]
    x = torch.stack([common + kinds[kind[p[0]]] + 0.05 * torch.randn(4, 16, generator=gen) for p in prompts])
    _, shares = gates.fit_rows(batch, x)
    assert [shares[e][e] for e in range(3)] == [1.0, 1.0, 1.0], shares


def test_prompts_run_in_groups_of_similar_length():
    lengths = [40, 3, 38, 10, 29, 9, 31, 2]
    experts = [ExpertSource(name, positive=tuple("x" * n for n in part))
               for name, part in (("a", lengths[:4]), ("b", lengths[4:]))]
    batch = gates.PromptBatch.of(lambda text: {"input_ids": list(range(1, len(text) + 1))}, experts)
    groups = batch.groups()
    real = batch.real.sum(1)
    assert sorted(torch.cat(groups).tolist()) == list(range(len(lengths)))  # each prompt in one group
    assert all(4 * int(real[rows].min()) >= 3 * int(real[rows].max()) for rows in groups)
    run = sum(len(rows) * int(real[rows].max()) for rows in groups)  # tokens the groups run, padding included
    assert run < 1.25 * int(real.sum()) and batch.ids.numel() > 1.9 * int(real.sum())


@pytest.mark.parametrize("gate", [Gate.HIDDEN, Gate.CHEAP_EMBED])
@pytest.mark.parametrize("family", ["llama", "gemma3_text", "gpt2"])  # plain, scaled and position embeddings
def test_learnt_gates_equal_the_whole_models(family: str, gate: Gate, tmp_path: Path):
    folder = add_char_tokenizer(make_tiny(family, tmp_path / family))
    adapter = adapter_for(Checkpoint(folder).config)
    layers = [0, 1]
    expected = whole_model_rows(folder, gate, layers)
    got = gates.learnt(Spec(gate=gate), folder, adapter, layers, PROMPTS)
    for i in layers:
        torch.testing.assert_close(got.row(i), expected[i], rtol=1e-5, atol=1e-5 * float(expected[i].abs().max()))


@pytest.mark.parametrize("gate", [Gate.HIDDEN, Gate.CHEAP_EMBED])
def test_learnt_gates_read_no_layer_after_the_last_moe_layer(models: Models, gate: Gate, monkeypatch):
    read: list[str] = []
    original = Checkpoint.read
    monkeypatch.setattr(Checkpoint, "read", lambda self, name, *a, **k: read.append(name) or original(self, name, *a, **k))
    gates.learnt(Spec(gate=gate), models.base, adapter_for(Checkpoint(models.base).config), [0], PROMPTS)
    assert "model.embed_tokens.weight" in read
    layers = {int(name.split(".")[2]) for name in read if name.startswith("model.layers.")}
    assert layers == ({0} if gate is Gate.HIDDEN else set())  # of 3; cheap-embed reads the embeddings alone


def test_shards_are_written_while_the_gates_are_learnt(models: Models, tmp_path: Path, monkeypatch):
    """The first layer's row waits until the writer has read a fine-tune's expert of the last layer:
    only a writer that leaves the routers for the end gets there (else this fails after the timeout)."""
    last_expert_read = threading.Event()
    original_read, original_fit = Checkpoint.read, gates.fit_rows
    tune = models.tunes["digits"]

    def read(self, name, *args, **kwargs):
        if self.folder == tune and name.startswith("model.layers.2.mlp."):
            last_expert_read.set()
        return original_read(self, name, *args, **kwargs)

    fitted = []

    def fit_rows(batch, x):
        fitted.append(len(fitted))
        if len(fitted) == 1:
            assert last_expert_read.wait(timeout=30), "the writer waited for a router while it had experts to write"
        return original_fit(batch, x)

    monkeypatch.setattr(Checkpoint, "read", read)
    monkeypatch.setattr(gates, "fit_rows", fit_rows)
    out = tmp_path / "out"
    assert merge(models, out) == 0
    assert len(fitted) == 3 and last_expert_read.is_set()
    routing = json.loads((out / "moeify.json").read_text())["routing"]
    assert set(routing["top1_shares"]) == {"0", "1", "2"}  # the report waited for every layer
    names = [name for _, name in sorted((info.offset, name) for name, info in Checkpoint(out).tensors.items())]
    routers = [i for i, name in enumerate(names) if name.endswith(".gate.weight")]
    assert routers == list(range(len(names) - 3, len(names)))  # the three routers, after every other tensor


def test_the_gates_take_one_thread_while_the_writer_works_and_all_once_it_waits(models: Models, tmp_path: Path,
                                                                               monkeypatch):
    """Two threads of products beside the writer ran at a third of their speed; one keeps its pace."""
    asked = threading.Event()
    original_row, original_fit = gates.Learning.row, gates.fit_rows

    def row(self, layer):
        asked.set()
        return original_row(self, layer)

    threads = []

    def fit_rows(batch, x):
        threads.append(torch.get_num_threads())
        if len(threads) == 1:  # layer 0 ran while the writer had experts to write
            assert asked.wait(timeout=30), "the writer never asked for a router"
        return original_fit(batch, x)

    monkeypatch.setattr(gates.Learning, "row", row)
    monkeypatch.setattr(gates, "fit_rows", fit_rows)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert merge(models, tmp_path / "out") == 0
        assert threads == [1, 2, 2]
        assert torch.get_num_threads() == 2  # given back
    finally:
        torch.set_num_threads(before)


def test_an_error_while_the_gates_are_learnt_is_one_line_and_writes_nothing(models: Models, tmp_path: Path,
                                                                           monkeypatch, capsys):
    original_fit = gates.fit_rows
    fitted = []

    def fit_rows(batch, x):  # fails at the second layer, while the writer is under way
        fitted.append(1)
        if len(fitted) == 2:
            raise MoeifyError("the prompts of layer 1 cannot be told apart")
        return original_fit(batch, x)

    monkeypatch.setattr(gates, "fit_rows", fit_rows)
    output = tmp_path / "out"
    assert_one_line_error(capsys, merge(models, output), "layer 1 cannot be told apart")
    assert not output.exists() and not leftovers(output)
    assert not [t for t in threading.enumerate() if t.name == "moeify-gates"]  # the thread ended with the run


def test_an_error_of_the_gates_stops_the_writer_at_its_next_layer(models: Models, tmp_path: Path, monkeypatch,
                                                                   capsys):
    """The routers are written last; a failure of the gates must not wait for every expert to be written."""
    original_read, original_fit = Checkpoint.read, gates.fit_rows
    read = []

    def fit_rows(batch, x):
        raise MoeifyError("the prompts of layer 0 cannot be told apart")

    def reading(self, name, *args, **kwargs):
        if self.folder in models.tunes.values() and ".mlp." in name:
            read.append(int(name.split(".")[2]))
            if read[-1] == 1:  # let the gates' thread fail first
                deadline = time.monotonic() + 30
                while any(t.name == "moeify-gates" for t in threading.enumerate()) and time.monotonic() < deadline:
                    time.sleep(0.01)
        return original_read(self, name, *args, **kwargs)

    monkeypatch.setattr(gates, "fit_rows", fit_rows)
    monkeypatch.setattr(Checkpoint, "read", reading)
    output = tmp_path / "out"
    assert_one_line_error(capsys, merge(models, output), "layer 0 cannot be told apart")
    assert 2 not in read, read  # stopped before the last layer's experts
    assert not output.exists() and not leftovers(output)


def test_an_error_while_writing_stops_the_gates_before_their_next_layer(models: Models, tmp_path: Path,
                                                                      monkeypatch, capsys):
    from moeify import conversion
    from moeify.layerwise import LayerwiseModel

    learnings, ran, started = [], [], threading.Event()
    original_init, original_run_layer = gates.Learning.__init__, LayerwiseModel.run_layer

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        learnings.append(self)

    def run_layer(self, index, *args, **kwargs):  # layer 0 runs on only once the run is stopping
        ran.append(index)
        started.set()
        assert learnings[0]._stop.wait(timeout=60)
        return original_run_layer(self, index, *args, **kwargs)

    def write_shards(*args, **kwargs):  # fails while the gates are at layer 0
        assert started.wait(timeout=60)
        raise MoeifyError("no space left for the shards")

    monkeypatch.setattr(gates.Learning, "__init__", init)
    monkeypatch.setattr(LayerwiseModel, "run_layer", run_layer)
    monkeypatch.setattr(conversion, "write_shards", write_shards)
    output = tmp_path / "out"
    assert_one_line_error(capsys, merge(models, output, "--moe-layers", "2"), "no space left")
    assert ran == [0]  # layers 1 and 2 never ran: the thread stopped before each next layer
    assert not output.exists() and not leftovers(output)
    assert not [t for t in threading.enumerate() if t.name == "moeify-gates"]


# ---------------------------------------------------------------------------- bad input


def bad_merge(models: Models, tmp_path: Path, kind: str) -> tuple[list, tuple[str, ...]]:
    """Arguments of a merge that must be refused, and words its error line must contain."""
    good = ["--expert", f"{models.tunes['digits']}:{models.prompts['digits']}"]
    if kind == "family":
        other = add_char_tokenizer(make_tiny("mistral", tmp_path / "mistral"))
        return good + ["--expert", other], ("is a mistral model", "BASE is llama")
    if kind == "hidden size":
        other = make_tiny("llama", tmp_path / "wide", hidden_size=32)
        return good + ["--expert", other], ("hidden_size=32", "BASE has 64")
    if kind == "vocabulary":
        other = make_tiny("llama", tmp_path / "vocab", vocab_size=300)
        return good + ["--expert", other], ("vocab_size=300", "211")
    if kind == "tokens":  # same vocabulary size, two tokens swapped: same shapes, other meanings
        other = Path(shutil.copytree(models.tunes["words"], tmp_path / "swapped"))
        tokenizer = json.loads((other / "tokenizer.json").read_text())
        vocab = tokenizer["model"]["vocab"]
        vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
        (other / "tokenizer.json").write_text(json.dumps(tokenizer))
        return good + ["--expert", other], ("tokenizer vocabulary differs", "swapped")
    if kind == "empty prompt file":
        (tmp_path / "empty.txt").write_text("\n\n")
        return good + ["--expert", f"{models.tunes['words']}:{tmp_path / 'empty.txt'}"], ("no positive prompt",)
    if kind == "unknown expert":
        (tmp_path / "prompts.yaml").write_text("nobody:\n  positive: [hello]\n")
        return good + ["--expert", models.tunes["words"], "--prompts", tmp_path / "prompts.yaml"], (
            "names expert 'nobody'", "which no --expert gives")
    if kind == "no prompts":
        return good + ["--expert", models.tunes["words"], "--gate", "hidden"], ("needs positive prompts", "expert 1")
    assert kind == "same prompts"
    return ["--expert", f"{models.tunes['digits']}:{models.prompts['digits']}",
            "--expert", f"{models.tunes['words']}:{models.prompts['digits']}"], ("same prompts",)


@pytest.mark.parametrize("text", ['{"model": 5}', '{"model": {"vocab": 5}}', "[1]", "[" * 100_000 + "]" * 100_000])
def test_an_unreadable_tokenizer_json_has_no_vocabulary(tmp_path: Path, text: str):
    """A source's tokenizer.json is compared with BASE's when both have a vocabulary, never a traceback."""
    from moeify.merge import _vocab

    path = tmp_path / "tokenizer.json"
    path.write_text(text)
    assert _vocab(path) is None


@pytest.mark.parametrize("kind", ["family", "hidden size", "vocabulary", "tokens", "empty prompt file",
                                  "unknown expert", "no prompts", "same prompts"])
def test_bad_merge_is_one_line_and_writes_nothing(models: Models, tmp_path: Path, capsys, kind: str):
    args, needles = bad_merge(models, tmp_path, kind)
    out = tmp_path / "out"
    capsys.readouterr()
    assert_one_line_error(capsys, run_cli("merge", models.base, *args, "--output", out), *needles)
    assert not out.exists() and not leftovers(out)
