"""`moeify train` on tiny models: what trains and what stays bit for bit, every output format
loading again in its own format, resuming after a real kill, and every bad input refused in one
line with nothing written."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, MixtralForCausalLM, Qwen2MoeForCausalLM

from moeify import source
from moeify.conversion import convert
from moeify.errors import MoeifyError
from moeify.spec import Format, Spec
from moeify import documents
from moeify.training import data
from moeify.training.checkpoints import Checkpoints
from moeify.training.settings import Precision, Settings, Trainable
from moeify.training.trainer import _precision
from tests.fixtures import make_tiny, run_cli
from tests.test_cli_errors import assert_one_line_error
from tests.test_documents import table_file
from tests.test_split import add_char_tokenizer

REPO = Path(__file__).resolve().parents[1]
TEXT = REPO / "benchmarks" / "data" / "calibration.txt"  # ~6.8k characters: ~6.8k tokens of the char tokenizer
SMALL = ("--seq-len", 32, "--batch-size", 4)  # one step: 128 tokens


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Tiny sources with a character tokenizer, and moeify outputs of them in every format."""
    root = tmp_path_factory.mktemp("train")
    llama = add_char_tokenizer(make_tiny("llama", root / "llama"))
    qwen2 = qwen_char_tokenizer(make_tiny("qwen2", root / "qwen2"))
    out = {"llama": llama, "qwen2": qwen2}
    jobs = {"mixtral": (llama, Spec(experts=4, topk=2, noise=0.01)),
            "remote": (llama, Spec(experts=4, topk=2, shared_experts=1, noise=0.01, format=Format.REMOTE)),
            "qwen2_moe": (qwen2, Spec(experts=4, topk=2, shared_experts=1, noise=0.01))}
    for name, (origin, spec) in jobs.items():
        out[name] = root / name
        convert(origin, out[name], spec, source=str(origin))
        SOURCES[out[name]] = origin
    out["split"] = root / "split"
    SOURCES[out["split"]] = llama
    assert run_cli("split", llama, "--granularity", 4, "--topk", 2, "--partition", "contiguous",
                   "--router-init", "centroid", "--output", out["split"]) == 0
    return out


# Each output's dense source. moeify.json names a local source by folder name only (no path), so
# the tests pass it as --teacher; test_the_recorded_source_is_the_default_teacher covers the default.
SOURCES: dict[Path, Path] = {}


def qwen_char_tokenizer(folder: Path) -> Path:
    """The character tokenizer with Qwen's end-of-text token: transformers loads a qwen2 folder's
    tokenizer as Qwen2Tokenizer, which adds <|endoftext|> when the vocabulary lacks it, and the
    source's and the MoE's vocabularies would then differ."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tokenizer_models
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {"<unk>": 0, "<s>": 1, "<|endoftext|>": 2} | {c: i + 3 for i, c in enumerate(chars)}
    tokenizer = Tokenizer(tokenizer_models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="<|endoftext|>",
                            unk_token="<unk>").save_pretrained(folder)
    return folder


def tensors_of(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, framework="pt") as f:
            out |= {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    return out


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def train(model: Path, output: Path, *options: object) -> int:
    teacher = ["--teacher", SOURCES[model]] if model in SOURCES and "--teacher" not in options else []
    return run_cli("train", model, "--data", TEXT, "--output", output, *SMALL, *teacher, *options)


def record_of(folder: Path) -> dict:
    return json.loads((folder / "moeify.json").read_text())


# ---------------------------------------------------------------------------- what trains


def test_healing_a_split_trains_only_its_routers_by_default(models: dict[str, Path], tmp_path: Path):
    out = tmp_path / "healed"
    assert train(models["split"], out, "--steps", 4) == 0
    training = record_of(out)["training"][-1]
    assert (training["settings"]["train"], training["settings"]["distill"], training["settings"]["lm"]) == \
        ("routers", 1.0, 0.0)
    assert training["teacher"] == "llama" and training["steps"] == 4 and training["tokens"] == 512
    before, after = tensors_of(models["split"]), tensors_of(out)
    routers = {name for name in before if name.endswith("router.weight")}
    assert routers and set(before) == set(after)
    assert all(same_bits(before[n], after[n]) for n in before if n not in routers)
    assert all(not torch.equal(before[n], after[n]) for n in routers)
    for name in ("config.json", "configuration_moeify.py", "modeling_moeify.py", "tokenizer.json"):
        assert (out / name).read_bytes() == (models["split"] / name).read_bytes(), name
    assert "## Training" in (out / "README.md").read_text()
    assert str(models["llama"].parent) not in (out / "moeify.json").read_text() + (out / "README.md").read_text()
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log if "distill" in row] == [1, 2, 3, 4]
    assert run_cli("verify", models["llama"], out, "--tokens", 64) == 0


@pytest.mark.parametrize("fmt, cls", [("mixtral", MixtralForCausalLM), ("qwen2_moe", Qwen2MoeForCausalLM),
                                      ("remote", None)])
def test_every_format_trains_and_loads_again_as_itself(models: dict[str, Path], tmp_path: Path, fmt: str, cls):
    out = tmp_path / fmt
    assert train(models[fmt], out, "--train", "all", "--steps", 6, "--lr", "3e-3") == 0
    before, after = tensors_of(models[fmt]), tensors_of(out)
    assert {n: (t.shape, t.dtype) for n, t in before.items()} == {n: (t.shape, t.dtype) for n, t in after.items()}
    assert sum(not torch.equal(before[n], after[n]) for n in before) == len(before)  # --train all: every tensor
    model, info = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=cls is None, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert type(model).__name__ == (cls.__name__ if cls else "MoeifyForCausalLM")
    training = record_of(out)["training"][-1]
    assert training["perplexity_after"] < training["perplexity_before"]  # it learnt the text
    source = models["qwen2" if fmt == "qwen2_moe" else "llama"]
    assert run_cli("verify", source, out, "--tokens", 64) == 0


def test_freeze_keeps_matching_tensors_bit_for_bit(models: dict[str, Path], tmp_path: Path):
    out = tmp_path / "frozen"
    assert train(models["mixtral"], out, "--train", "all", "--freeze", "layers.0.", "--freeze", "*embed*",
                 "--steps", 3, "--lr", "1e-3") == 0
    before, after = tensors_of(models["mixtral"]), tensors_of(out)
    frozen = {n for n in before if "layers.0." in n or "embed" in n}
    assert frozen and all(same_bits(before[n], after[n]) for n in frozen)
    assert all(not torch.equal(before[n], after[n]) for n in set(before) - frozen)
    assert record_of(out)["training"][-1]["settings"]["freeze"] == ["layers.0.", "*embed*"]


@pytest.mark.parametrize("fmt", ["mixtral", "qwen2_moe", "remote"])
def test_experts_frozen_by_expand_stay_bit_for_bit(models: dict[str, Path], tmp_path: Path, fmt: str):
    """`moeify expand --freeze old` records the old experts in config.json; training keeps them, whole
    modules (remote) or slices of fused 3-D tensors (native, with weight decay on)."""
    grown, out = tmp_path / "grown", tmp_path / "trained"
    assert run_cli("expand", models[fmt], "--add", 1, "--from", "copy:0", "--freeze", "old", "--output", grown) == 0
    assert train(grown, out, "--train", "experts", "--steps", 3, "--lr", "3e-2", "--weight-decay", "0.1") == 0
    before, after = tensors_of(grown), tensors_of(out)
    old = {n for n in before if (m := re.search(r"\.experts\.(\d+)\.", n)) and int(m.group(1)) < 4}
    layers = len({n.split(".experts.")[0] for n in old})
    assert layers >= 2 and len(old) == layers * 4 * 3  # layers x old experts x projections
    assert all(same_bits(before[n], after[n]) for n in old)
    routers = [n for n in before if n.endswith((".gate.weight", "router.weight")) and "shared" not in n]
    assert routers and all(not torch.equal(before[n], after[n]) for n in routers)


def test_upcycle_defaults_continue_training_with_lm_and_aux(models: dict[str, Path], tmp_path: Path):
    out = tmp_path / "continued"
    assert train(models["remote"], out, "--steps", 2, "--log-every", 1) == 0
    settings = record_of(out)["training"][-1]["settings"]
    assert (settings["train"], settings["lm"], settings["distill"], settings["lr"]) == ("moe", 1.0, 0.0, 1e-4)
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    steps = [row for row in rows if "loss" in row]
    assert all({"lm", "aux", "lr", "tokens"} <= set(row) for row in steps) and steps[-1]["tokens"] == 256
    before, after = tensors_of(models["remote"]), tensors_of(out)
    attention = [n for n in before if "self_attn" in n or "norm" in n or "embed" in n]
    assert attention and all(same_bits(before[n], after[n]) for n in attention)


def test_the_log_gives_the_rate_each_step_used(models: dict[str, Path], tmp_path: Path, capsys):
    """Warmup, then cosine to zero: the last step still trains at a rate above zero (the next would not)."""
    out = tmp_path / "out"
    assert train(models["mixtral"], out, "--steps", 2, "--log-every", 1, "--lr", "5e-4") == 0
    rates = [row["lr"] for row in map(json.loads, (out / "train_log.jsonl").read_text().splitlines()) if "lr" in row]
    assert len(rates) == 2 and rates[0] == pytest.approx(5e-4) and 0 < rates[1] < 5e-4
    assert "none saved" in capsys.readouterr().out  # --save-every 100: no checkpoint to point at


def test_local_objective_trains_each_moe_layer_against_its_dense_ffn(models: dict[str, Path], tmp_path: Path):
    out = tmp_path / "local"
    assert train(models["split"], out, "--objective", "local", "--train", "moe", "--steps", 8, "--lr", "3e-3") == 0
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    local = [row["local"] for row in rows if "local" in row]
    assert len(local) == 8 and local[-1] < local[0] and not any("distill" in row for row in rows)
    before, after = tensors_of(models["split"]), tensors_of(out)
    moe = {n for n in before if ".mlp." in n}
    assert moe and all(not torch.equal(before[n], after[n]) for n in moe)
    assert all(same_bits(before[n], after[n]) for n in set(before) - moe)


def test_plot_draws_the_log(models: dict[str, Path], tmp_path: Path):
    png = tmp_path / "curves" / "train.png"
    assert train(models["mixtral"], tmp_path / "out", "--steps", 3, "--eval-every", 1, "--plot", png) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_plot_without_a_suffix_is_a_png_and_says_so(models: dict[str, Path], tmp_path: Path, capsys):
    assert train(models["mixtral"], tmp_path / "out", "--steps", 1, "--plot", tmp_path / "curves") == 0
    assert f"written to {tmp_path / 'curves.png'}" in capsys.readouterr().err
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("name, needles", [("curves.txt", ("matplotlib cannot write .txt", ".png")),
                                           ("folder", ("is a folder",))])
def test_a_plot_file_matplotlib_cannot_write_is_refused_before_training(models: dict[str, Path], tmp_path: Path,
                                                                       capsys, name: str, needles):
    (tmp_path / "folder").mkdir()
    code = train(models["mixtral"], tmp_path / "out", "--steps", 1, "--plot", tmp_path / name)
    assert_one_line_error(capsys, code, *needles)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder"]  # no output, no checkpoints


def test_training_twice_keeps_both_records(models: dict[str, Path], tmp_path: Path):
    once, twice = tmp_path / "once", tmp_path / "twice"
    assert train(models["split"], once, "--steps", 1) == 0
    assert train(once, twice, "--steps", 1, "--lr", "5e-4", "--teacher", models["llama"]) == 0
    runs = record_of(twice)["training"]
    assert [r["settings"]["lr"] for r in runs] == [1e-4, 5e-4] and runs[1]["model"] == "once"
    assert record_of(twice)["source"] == record_of(models["split"])["source"]  # still the dense source


@pytest.mark.parametrize("kind", ["parquet", "dataset folder"])
def test_tables_and_dataset_folders_train_like_their_text(models: dict[str, Path], tmp_path: Path, kind: str):
    """The same paragraphs as a .jsonl, a Parquet file and a folder `datasets` reads (a stream: read
    only as far as the run needs) train the same steps to the same weights."""
    paragraphs = [p for p in TEXT.read_text().split("\n\n") if p.strip()]
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs))
    if kind == "parquet":
        data_path = table_file(tmp_path / "rows.parquet", {"text": paragraphs})
    else:
        data_path = tmp_path / "set"
        data_path.mkdir()
        table_file(data_path / "train.parquet", {"text": paragraphs})
    held = tmp_path / "held.txt"  # held-out text of its own: every run trains on all it reads
    held.write_text(paragraphs[-1])
    common = ("--steps", 2, "--eval-text", held)
    assert run_cli("train", models["mixtral"], "--data", jsonl, "--output", tmp_path / "a", *SMALL, *common,
                   "--teacher", SOURCES[models["mixtral"]]) == 0
    assert run_cli("train", models["mixtral"], "--data", data_path, "--output", tmp_path / "b", *SMALL, *common,
                   "--teacher", SOURCES[models["mixtral"]], "--save-every", 1) == 0
    a, b = tensors_of(tmp_path / "a"), tensors_of(tmp_path / "b")
    if kind == "parquet":  # read whole, like the .jsonl: the same sequences in the same order
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    else:  # a stream of 2 steps' sequences is a prefix of the file's: another permutation, so another run
        assert record_of(tmp_path / "b")["training"][-1]["tokens"] == 2 * 4 * 32
    assert record_of(tmp_path / "b")["training"][-1]["settings"]["data"] == data_path.name
    shutil.rmtree(tmp_path / "b")  # its checkpoints are kept: the stream is read the same way again
    assert run_cli("train", models["mixtral"], "--data", data_path, "--output", tmp_path / "b", *SMALL, *common,
                   "--teacher", SOURCES[models["mixtral"]], "--save-every", 1, "--resume") == 0


def test_the_recorded_source_is_the_default_teacher(models: dict[str, Path], tmp_path: Path, monkeypatch, capsys):
    """moeify.json names a local source by its folder name: found from the folder that holds it, and only
    when its weights are the recorded ones."""
    monkeypatch.chdir(models["llama"].parent)
    assert run_cli("train", models["split"], "--data", TEXT, "--output", tmp_path / "out", *SMALL, "--steps", 1) == 0
    assert record_of(tmp_path / "out")["training"][-1]["teacher"] == "llama"
    monkeypatch.chdir(tmp_path)  # no folder named llama here
    monkeypatch.setattr(source, "_resolved", {})  # moeify resolves a name once per run; this is a new run
    capsys.readouterr()
    code = run_cli("train", models["split"], "--data", TEXT, "--output", tmp_path / "again", *SMALL)
    assert_one_line_error(capsys, code, "'llama'", "not found", "--teacher")
    make_tiny("llama", tmp_path / "llama", seed=1)  # a folder of that name, other weights
    add_char_tokenizer(tmp_path / "llama")
    monkeypatch.setattr(source, "_resolved", {})
    capsys.readouterr()
    code = run_cli("train", models["split"], "--data", TEXT, "--output", tmp_path / "again", *SMALL)
    assert_one_line_error(capsys, code, "'llama'", "not the source", "--teacher")
    assert not (tmp_path / "again").exists() and not (tmp_path / "again.checkpoints").exists()


# ---------------------------------------------------------------------------- checkpoints and resuming


def cli_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}


def start(*args: object) -> subprocess.Popen:
    """`python -m moeify ARGS` in a child process."""
    return subprocess.Popen([sys.executable, "-m", "moeify", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=cli_env())


def finished(child: subprocess.Popen) -> int:
    _, err = child.communicate(timeout=300)
    assert child.returncode == 0, err
    return child.returncode


def wait_for(path: Path, child: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    if child.poll() is not None:
        raise AssertionError(f"the run ended before it could be interrupted: {child.communicate()[1][-2000:]}")
    assert path.exists(), "no checkpoint in time"


def test_resume_after_a_kill_reaches_the_same_weights(models: dict[str, Path], tmp_path: Path):
    options = ("--steps", 16, "--save-every", 2, "--lr", "1e-3", "--train", "moe")
    reference, out = tmp_path / "reference", tmp_path / "out"
    # Every run in a child process of its own, so all three share one environment (in-process,
    # torch.set_num_threads(1) and OMP_NUM_THREADS=1 can pick kernels that round differently).
    args = ("train", models["remote"], "--data", TEXT, *SMALL, *options)
    assert finished(start(*args, "--output", reference)) == 0
    child = start(*args, "--output", out)
    try:
        wait_for(out.with_name("out.checkpoints") / "step-00000004" / "moeify_state.json", child)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
    assert not out.exists() and not list(tmp_path.glob(".out.moeify-*"))  # no partial model folder
    latest = Checkpoints(tmp_path / "out.checkpoints", 2).latest()
    assert latest is not None and 4 <= int(latest.name.split("-")[1]) < 16
    assert finished(start(*args, "--output", out, "--resume")) == 0
    expected, got = tensors_of(reference), tensors_of(out)
    assert all(same_bits(expected[n], got[n]) for n in expected)
    losses = [[(r["step"], r["loss"]) for r in map(json.loads, (folder / "train_log.jsonl").read_text().splitlines())
               if "loss" in r] for folder in (reference, out)]
    assert losses[0] == losses[1]  # the resumed run saw the same batches in the same order


def _damage(step: Path, how: str) -> None:
    state = step / "moeify_state.json"
    if how == "state not json":
        state.write_text("{not json")
        return
    if how == "state of the wrong kind":
        state.write_text(json.dumps({"run": [], "progress": {"step": "two"}}))
        return
    if how == "forged step":
        saved = json.loads(state.read_text())
        saved["progress"]["step"] = 10**9
        state.write_text(json.dumps(saved))
        return
    weights = next(p for p in step.iterdir() if p.name.startswith(("pytorch_model", "model")))
    weights.write_bytes(weights.read_bytes()[:100])  # cut short


@pytest.mark.parametrize("how", ["state not json", "state of the wrong kind", "forged step", "weights cut short"])
def test_a_damaged_checkpoint_is_one_line(models: dict[str, Path], tmp_path: Path, capsys, how: str):
    out = tmp_path / "out"
    options = ("--steps", 2, "--save-every", 1)
    assert train(models["mixtral"], tmp_path / "first", *options, "--checkpoint-dir", tmp_path / "ckpt") == 0
    _damage(tmp_path / "ckpt" / "step-00000002", how)
    capsys.readouterr()
    code = train(models["mixtral"], out, *options, "--checkpoint-dir", tmp_path / "ckpt", "--resume")
    assert_one_line_error(capsys, code, "step-00000002 is damaged", "--overwrite")
    assert not out.exists() and not list(tmp_path.glob(".out.moeify-*"))


def test_a_checkpoint_folder_inside_the_model_or_a_file_is_refused(models: dict[str, Path], tmp_path: Path, capsys):
    model = tmp_path / "model"
    shutil.copytree(models["mixtral"], model)
    before = sorted(p.name for p in model.iterdir())
    code = train(model, tmp_path / "out", "--steps", 1, "--teacher", SOURCES[models["mixtral"]],
                 "--checkpoint-dir", model / "ckpt")
    assert_one_line_error(capsys, code, "inside the model", "--checkpoint-dir")
    assert sorted(p.name for p in model.iterdir()) == before and not (tmp_path / "out").exists()
    (tmp_path / "a-file").write_text("not a folder")
    code = train(model, tmp_path / "out", "--steps", 1, "--teacher", SOURCES[models["mixtral"]],
                 "--checkpoint-dir", tmp_path / "a-file")
    assert_one_line_error(capsys, code, "a-file is a file", "--checkpoint-dir")


def test_ctrl_c_leaves_the_last_checkpoint_and_no_model(models: dict[str, Path], tmp_path: Path):
    out = tmp_path / "out"
    child = start("train", models["mixtral"], "--data", TEXT, "--output", out, *SMALL, "--steps", 500,
                  "--save-every", 1, "--keep-checkpoints", 1)
    try:
        wait_for(tmp_path / "out.checkpoints" / "step-00000002" / "moeify_state.json", child)
        child.send_signal(signal.SIGINT)
        _, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 130, err
    assert "error: interrupted" in err and "--resume" in err and "Traceback" not in err, err
    assert "aborted" not in err, err  # one line says it all
    assert not out.exists() and not list(tmp_path.glob(".out.moeify-*"))
    kept = sorted(p.name for p in (tmp_path / "out.checkpoints").iterdir())
    # One checkpoint, or two when the signal came between writing the newest and pruning the oldest.
    assert 1 <= len([k for k in kept if k.startswith("step-")]) <= 2, (kept, err)
    assert not [k for k in kept if k.startswith(".")], (kept, err)  # no partial checkpoint
    latest = Checkpoints(tmp_path / "out.checkpoints", 1).latest()
    assert Checkpoints(tmp_path / "out.checkpoints", 1).progress(latest).step >= 2


def test_checkpoints_keep_the_last_k(models: dict[str, Path], tmp_path: Path):
    out = tmp_path / "out"
    assert train(models["mixtral"], out, "--steps", 5, "--save-every", 1, "--keep-checkpoints", 2) == 0
    folder = tmp_path / "out.checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["step-00000004", "step-00000005", "train_log.jsonl"]
    assert json.loads((folder / "step-00000005" / "moeify_state.json").read_text())["progress"]["step"] == 5


# ---------------------------------------------------------------------------- bad input


def leftovers(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir() if p.name not in ("data", "teacher", "model"))


def bad_case(kind: str, models: dict[str, Path], tmp_path: Path) -> tuple[list[object], tuple[str, ...]]:
    """Arguments after `train` for one bad input, and words its error line must contain."""
    (tmp_path / "data").mkdir()
    good = [models["mixtral"], "--data", TEXT, *SMALL]
    if kind == "dense":
        return [models["llama"], "--data", TEXT], ("dense model", "moeify upcycle", "moeify split")
    if kind == "not moeify":
        shutil.copytree(models["mixtral"], tmp_path / "model")
        (tmp_path / "model" / "moeify.json").unlink()
        return [tmp_path / "model", "--data", TEXT], ("no moeify.json",)
    if kind == "foreign code":
        shutil.copytree(models["remote"], tmp_path / "model")
        with open(tmp_path / "model" / "modeling_moeify.py", "a") as f:
            f.write("\nprint('not what moeify shipped')\n")
        return [tmp_path / "model", "--data", TEXT], ("modeling_moeify.py", "--trust-remote-code")
    if kind == "data missing":
        return [models["mixtral"], "--data", tmp_path / "data" / "nope.txt"], ("nope.txt", "does not exist")
    if kind == "data empty":
        (tmp_path / "data" / "empty.txt").write_text("  \n\n")
        return [models["mixtral"], "--data", tmp_path / "data" / "empty.txt"], ("empty.txt", "is empty")
    if kind == "data a folder":
        (tmp_path / "data" / "folder.txt").mkdir()
        return [models["mixtral"], "--data", tmp_path / "data" / "folder.txt"], ("folder.txt", "without data files")
    if kind == "data other format":
        (tmp_path / "data" / "d.csv").write_text("text\nhello\n")
        return [models["mixtral"], "--data", tmp_path / "data" / "d.csv"], ("d.csv", ".txt, .jsonl, .parquet or .arrow")
    if kind == "data bad parquet":
        (tmp_path / "data" / "d.parquet").write_bytes(b"PAR1")
        return [models["mixtral"], "--data", tmp_path / "data" / "d.parquet"], ("d.parquet", "not a readable parquet")
    if kind == "table without text":
        table_file(tmp_path / "data" / "t.parquet", {"body": ["no text column here"]})
        return [models["mixtral"], "--data", tmp_path / "data" / "t.parquet"], ("t.parquet", "\"text\"", "body")
    if kind == "stream without length":
        (tmp_path / "data" / "set").mkdir()
        (tmp_path / "data" / "set" / "train.jsonl").write_text('{"text": "some words"}\n')
        return [models["mixtral"], "--data", tmp_path / "data" / "set"], ("set", "--steps or --max-tokens")
    if kind == "hub dataset unreachable":
        return [models["mixtral"], "--data", "nobody-here/no-such-dataset", "--steps", 1], \
            ("nobody-here/no-such-dataset", "neither a file here nor a dataset")
    if kind == "data too short":
        (tmp_path / "data" / "short.txt").write_text("hello")
        return [models["mixtral"], "--data", tmp_path / "data" / "short.txt", "--seq-len", 32], \
            ("short.txt", "fewer than one --seq-len sequence")
    if kind == "data binary":
        (tmp_path / "data" / "bin.txt").write_bytes(bytes(range(256)) * 40)
        return [models["mixtral"], "--data", tmp_path / "data" / "bin.txt"], ("bin.txt", "not a text file")
    if kind == "bad jsonl":
        (tmp_path / "data" / "d.jsonl").write_text('{"text": "fine"}\n{"body": "no text"}\n')
        return [models["mixtral"], "--data", tmp_path / "data" / "d.jsonl"], ("line 2", "\"text\"", "\"messages\"")
    if kind == "chat without template":
        (tmp_path / "data" / "c.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
        return [models["mixtral"], "--data", tmp_path / "data" / "c.jsonl"], ("chat template",)
    if kind == "seq-len":
        return [models["mixtral"], "--data", TEXT, "--seq-len", 300], ("--seq-len 300", "256 positions")
    if kind == "teacher vocab":
        from tests.test_verify import with_tokenizer
        with_tokenizer(make_tiny("llama", tmp_path / "teacher"))
        return good + ["--teacher", tmp_path / "teacher"], ("teacher", "vocabulary")
    if kind == "freeze":
        return good + ["--freeze", "nothing_like_this"], ("nothing_like_this", "model.layers.{i}.mlp.gate.weight")
    if kind == "nothing left":
        return good + ["--train", "routers", "--freeze", "gate"], ("leaves nothing to train",)
    if kind == "resume without checkpoint":
        return good + ["--resume"], ("--resume", "no complete checkpoint")
    if kind == "zero weights":
        return good + ["--distill", 0, "--lm", 0, "--aux", 0], ("every loss weight is 0",)
    if kind == "eval fraction":
        return good + ["--eval-fraction", 1.5], ("--eval-fraction",)
    raise AssertionError(kind)


BAD = ["dense", "not moeify", "foreign code", "data missing", "data empty", "data a folder", "data other format",
       "data bad parquet", "table without text", "stream without length", "hub dataset unreachable",
       "data too short", "data binary", "bad jsonl", "chat without template", "seq-len", "teacher vocab", "freeze",
       "nothing left",
       "resume without checkpoint", "zero weights", "eval fraction"]


@pytest.mark.parametrize("kind", BAD)
def test_bad_input_is_one_line_and_writes_nothing(models: dict[str, Path], tmp_path: Path, capsys, kind: str):
    args, needles = bad_case(kind, models, tmp_path)
    capsys.readouterr()
    code = run_cli("train", *args, "--output", tmp_path / "out")
    assert_one_line_error(capsys, code, *needles)
    assert leftovers(tmp_path) == []  # no output, no checkpoint folder, no staging


def test_unknown_train_choice_is_a_usage_error(models: dict[str, Path], tmp_path: Path, capsys):
    code = run_cli("train", models["mixtral"], "--data", TEXT, "--output", tmp_path / "out", "--train", "heads")
    err = capsys.readouterr().err
    assert code == 2 and "--train" in err and "heads" in err and "routers" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_output_in_the_way_needs_overwrite(models: dict[str, Path], tmp_path: Path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    assert_one_line_error(capsys, train(models["mixtral"], out, "--steps", 1), "not empty", "--overwrite")
    assert [p.name for p in out.iterdir()] == ["old.txt"] and not (tmp_path / "out.checkpoints").exists()
    assert train(models["mixtral"], out, "--steps", 1, "--overwrite") == 0
    assert not (out / "old.txt").exists() and (out / "moeify.json").is_file()


@pytest.mark.parametrize("output", ["model", "teacher", "holds the data", "holds the checkpoints"])
def test_an_output_that_would_replace_an_input_is_refused_before_training(models: dict[str, Path], tmp_path: Path,
                                                                          capsys, output: str):
    model, teacher, data = tmp_path / "model", tmp_path / "teacher", tmp_path / "texts" / "train.txt"
    shutil.copytree(models["mixtral"], model)
    shutil.copytree(models["llama"], teacher)
    data.parent.mkdir()
    shutil.copy(TEXT, data)
    before = {p: p.read_bytes() for p in (*model.rglob("*"), *teacher.rglob("*"), data) if p.is_file()}
    out = {"model": model, "teacher": teacher, "holds the data": data.parent,
           "holds the checkpoints": tmp_path / "runs"}[output]
    code = train(model, out, "--steps", 1, "--overwrite", "--teacher", teacher, "--distill", 1, "--data", data,
                 "--checkpoint-dir", tmp_path / "runs" / "ckpt")
    assert_one_line_error(capsys, code, str(out), "outside it")
    assert {p: p.read_bytes() for p in before} == before
    assert not (tmp_path / "runs").exists()


def test_earlier_checkpoints_need_resume_or_overwrite(models: dict[str, Path], tmp_path: Path, capsys):
    out, other = tmp_path / "out", tmp_path / "other"
    assert train(models["mixtral"], out, "--steps", 2, "--save-every", 1) == 0
    shutil.rmtree(out)
    capsys.readouterr()
    assert_one_line_error(capsys, train(models["mixtral"], out, "--steps", 2), "earlier run", "--resume",
                          "--overwrite")
    assert_one_line_error(capsys, train(models["mixtral"], out, "--steps", 2, "--lr", "0.5", "--resume"),
                          "another run", "lr")
    assert_one_line_error(capsys, train(models["qwen2_moe"], out, "--steps", 2, "--resume",
                                        "--checkpoint-dir", tmp_path / "out.checkpoints"), "another run", "model")
    assert not out.exists() and not other.exists()
    assert sorted(p.name for p in (tmp_path / "out.checkpoints").iterdir())[:2] == ["step-00000001", "step-00000002"]


# ---------------------------------------------------------------------------- pieces


def test_packing_and_order_are_deterministic():
    ids = torch.arange(103)
    packed = data.pack(ids, 10)
    assert packed.shape == (10, 10) and packed[-1, -1] == 99
    first = data.order(10, 25, seed=3)
    assert torch.equal(first, data.order(10, 25, seed=3)) and not torch.equal(first, data.order(10, 25, seed=4))
    assert sorted(first[:10].tolist()) == list(range(10)) and sorted(first[10:20].tolist()) == list(range(10))


def test_chat_messages_go_through_the_template(models: dict[str, Path], tmp_path: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(models["mixtral"])
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    path = tmp_path / "chat.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
                    '{"text": "plain"}\n')
    assert list(documents.documents(str(path), tokenizer)) == ["user: hi\nassistant: yo\n", "plain"]


def test_fp16_without_a_gpu_falls_back_to_fp32():
    notes: list[str] = []
    assert _precision(Precision.FP16, notes.append) == "no" and "fp32" in notes[0]
    assert _precision(Precision.BF16, notes.append) == "bf16" and len(notes) == 1


def test_bf16_training_on_cpu_writes_the_input_dtype(models: dict[str, Path], tmp_path: Path):
    out = tmp_path / "bf16"
    assert train(models["mixtral"], out, "--steps", 2, "--precision", "bf16") == 0
    assert {t.dtype for t in tensors_of(out).values()} == {torch.float32}


def test_settings_refuse_bad_values_and_fill_the_job():
    with pytest.raises(MoeifyError, match="--temperature"):
        Settings(data="x.txt", temperature=0)
    from moeify.spec import Mode

    healed = Settings(data="x.txt").for_job(Mode.SPLIT)
    assert (healed.train, healed.lr, healed.router_lr) == (Trainable.ROUTERS, 1e-4, 1e-4)
    assert Settings(data="x.txt", train="all").train is Trainable.ALL


# ---------------------------------------------------------------------------- recipes


RECIPE = """mode: split
granularity: 4
topk: 2
partition: contiguous
split_router: centroid
train:
  steps: 2
  seq_len: 32
  batch_size: 4
  lr: 1e-3
"""


def test_a_recipe_converts_then_trains(models: dict[str, Path], tmp_path: Path):
    recipe = tmp_path / "heal.yaml"
    recipe.write_text(RECIPE)
    out = tmp_path / "out"
    assert run_cli("apply", recipe, models["llama"], "--output", out, "--set", f"train.data={TEXT}",
                   "--set", "train.train=moe") == 0
    training = record_of(out)["training"][-1]
    assert training["settings"]["train"] == "moe" and training["steps"] == 2 and training["teacher"] == "llama"
    assert record_of(out)["mode"] == "split" and record_of(tmp_path / "out.converted")["mode"] == "split"
    assert "training" not in record_of(tmp_path / "out.converted")
    before, after = tensors_of(tmp_path / "out.converted"), tensors_of(out)
    assert any(not torch.equal(before[n], after[n]) for n in before)
    assert run_cli("apply", out / "moeify.json", models["llama"], "--output", tmp_path / "replayed") == 0
    assert "training" not in record_of(tmp_path / "replayed")  # the record of training is set aside


@pytest.mark.parametrize("extra, needles", [
    ([], ("names no data", "--set train.data=FILE")),
    (["--set", "train.data=missing.txt"], ("train.data", "missing.txt", "does not exist")),
    (["--set", "train.data=./notes"], ("train.data", "notes", "does not exist")),  # a path, not a Hub name
    (["--set", f"train.data={TEXT}", "--set", "train.steps=many"], ("train.steps", "whole number")),
    (["--set", f"train.data={TEXT}", "--set", "train.epochs=2"], ("unknown training field", "epochs")),
    (["--set", f"train.data={TEXT}", "--set", "train.train=heads"], ("heads", "routers|experts|moe|all")),
])
def test_a_bad_train_section_is_refused_before_converting(models: dict[str, Path], tmp_path: Path, capsys,
                                                          extra: list, needles: tuple):
    recipe = tmp_path / "heal.yaml"
    recipe.write_text(RECIPE)
    capsys.readouterr()
    code = run_cli("apply", recipe, models["llama"], "--output", tmp_path / "out", *extra)
    assert_one_line_error(capsys, code, *needles)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["heal.yaml"]


def test_a_recipe_streaming_its_data_needs_a_length_before_converting(models: dict[str, Path], tmp_path: Path,
                                                                       capsys):
    recipe = tmp_path / "heal.yaml"
    recipe.write_text(RECIPE.replace("  steps: 2\n", ""))
    (tmp_path / "set").mkdir()
    (tmp_path / "set" / "train.jsonl").write_text('{"text": "some words"}\n')
    capsys.readouterr()
    code = run_cli("apply", recipe, models["llama"], "--output", tmp_path / "out", "--set",
                   f"train.data={tmp_path / 'set'}")
    assert_one_line_error(capsys, code, "train.data", "stream", "train.steps or train.max_tokens")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["heal.yaml", "set"]


def test_a_run_that_reads_its_data_more_than_once_says_so(models: dict[str, Path], tmp_path: Path, capsys):
    short = tmp_path / "short.txt"
    short.write_text(TEXT.read_text()[:1000])  # 1000 characters: 31 sequences of 32, 29 to train on
    capsys.readouterr()
    assert run_cli("train", models["mixtral"], "--data", short, "--output", tmp_path / "out", *SMALL,
                   "--steps", 15, "--teacher", SOURCES[models["mixtral"]]) == 0
    assert "--data gives 928 training tokens; 15 steps read them 2.1 times over" in capsys.readouterr().err


@pytest.mark.parametrize("output", ["holds the source", "the current folder"])
def test_a_recipe_that_trains_refuses_its_output_before_converting(models: dict[str, Path], tmp_path: Path,
                                                                   capsys, monkeypatch, output: str):
    recipe = tmp_path / "heal.yaml"
    recipe.write_text(RECIPE)
    holder = tmp_path / "holder"
    source = Path(shutil.copytree(models["llama"], holder / "llama"))
    monkeypatch.chdir(tmp_path if output == "holds the source" else holder)
    out = holder if output == "holds the source" else Path("")
    code = run_cli("apply", recipe, source, "--output", out, "--overwrite", "--set", f"train.data={TEXT}")
    assert_one_line_error(capsys, code, "contains the source" if output == "holds the source" else "current folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["heal.yaml", "holder"]  # no .converted, no staging
    assert sorted(p.name for p in holder.iterdir()) == ["llama"]


def test_set_source_or_train_says_where_they_go(models: dict[str, Path], tmp_path: Path, capsys):
    for assignment, needle in (("source=x", "SOURCE argument"), ("train=x", "--set train.FIELD=VALUE")):
        code = run_cli("apply", "split", models["llama"], "--set", assignment, "--output", tmp_path / "out")
        assert_one_line_error(capsys, code, needle)
    assert list(tmp_path.iterdir()) == []


def test_the_shipped_split_heal_recipe_reads():
    from moeify import recipe as recipes
    from moeify.commands.train import recipe_section

    data = recipes.read(recipes.find("split-heal"))
    settings = recipe_section(data, {"train.data": str(TEXT)})
    assert (settings.train, settings.distill, settings.lm, settings.max_tokens) == (Trainable.ROUTERS, 1.0, 0.0, 100000)
    spec = recipes.spec_of(data)
    assert (spec.mode.value, spec.granularity, spec.topk, spec.refit) == ("split", 8, 4, True)

