"""Bad input and interruptions: one line on stderr, exit code 2, no traceback, nothing left on disk."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

import moeify.checkpoint
from tests.fixtures import make_tiny, run_cli

REPO = Path(__file__).resolve().parents[1]


def leftovers(output: Path) -> list[Path]:
    """Temporary folders a conversion into `output` could leave beside it."""
    return list(output.parent.glob(f".{output.name}.moeify-*"))


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_one_line_error(capsys, code: int, *needles: str) -> str:
    captured = capsys.readouterr()
    assert code == 2, captured.err
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert "Traceback" not in captured.err + captured.out
    assert captured.out == ""
    return lines[0]


def sharded(tmp_path: Path) -> Path:
    tiny = make_tiny("llama", tmp_path / "tiny")
    folder = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(tiny).save_pretrained(folder, max_shard_size="100KB")
    return folder


# ---------------------------------------------------------------------------- bad input


def bad_source(kind: str, tmp_path: Path) -> tuple[Path, tuple[str, ...]]:
    """A source folder broken in one way, and words its error line must contain."""
    if kind == "missing":
        return tmp_path / "no-such-model", ("no-such-model", "does not exist")
    if kind == "empty":
        (tmp_path / "empty").mkdir()
        return tmp_path / "empty", ("empty",)
    if kind == "plain-file":
        (tmp_path / "weights.bin").write_bytes(b"\0" * 64)
        return tmp_path / "weights.bin", ("weights.bin", "neither a model folder nor a .gguf file")
    if kind == "missing-gguf":
        return tmp_path / "model.gguf", ("model.gguf", "does not exist")
    if kind == "not-a-model":
        (tmp_path / "stuff").mkdir()
        (tmp_path / "stuff" / "notes.txt").write_text("hello")
        return tmp_path / "stuff", ("config.json",)
    source = make_tiny("llama", tmp_path / "tiny")
    weights = source / "model.safetensors"
    if kind == "bert":
        config = json.loads((source / "config.json").read_text())
        (source / "config.json").write_text(json.dumps(config | {"model_type": "bert"}))
        return source, ("'bert'", "not supported", "llama", "mistral")
    if kind == "truncated":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) - 1000])
        return source, ("model.safetensors", "truncated")
    if kind == "corrupted-header":
        data = bytearray(weights.read_bytes())
        data[8:40] = b"\x00\xff" * 16
        weights.write_bytes(bytes(data))
        return source, ("model.safetensors", "corrupted")
    if kind == "corrupted-entry":  # valid JSON, but an offset is not a number
        data = weights.read_bytes()
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + n])
        header["model.norm.weight"]["data_offsets"] = [str(o) for o in header["model.norm.weight"]["data_offsets"]]
        text = json.dumps(header).encode()
        weights.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + n :])
        return source, ("model.safetensors", "corrupted", "model.norm.weight")
    if kind == "missing-ffn-tensor":  # a complete file that lacks one of the FFN's tensors
        from safetensors.torch import load_file, save_file

        tensors = load_file(weights)
        del tensors["model.layers.1.mlp.down_proj.weight"]
        save_file(tensors, weights, {"format": "pt"})
        return source, ("model.layers.1.mlp.down_proj.weight", "missing")
    if kind == "missing-shard":
        source = sharded(tmp_path)
        victim = sorted(source.glob("model-*.safetensors"))[1]
        victim.unlink()
        return source, (victim.name, "missing")
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind", ["missing", "empty", "plain-file", "missing-gguf", "not-a-model", "bert", "truncated",
             "corrupted-header", "corrupted-entry", "missing-ffn-tensor", "missing-shard"]
)
def test_bad_source(tmp_path: Path, capsys, kind: str):
    source, needles = bad_source(kind, tmp_path)
    before = snapshot(source) if source.is_dir() else None
    capsys.readouterr()  # building the broken source printed transformers' own progress
    output = tmp_path / "out"
    code = run_cli("upcycle", source, "--experts", 4, "--topk", 2, "--output", output)
    assert_one_line_error(capsys, code, *needles)
    assert not output.exists() and not leftovers(output)
    if before is not None:
        assert snapshot(source) == before  # the source is never touched


@pytest.mark.parametrize(
    "options, needles",
    [
        (("--experts", 1), ("--experts", "at least 2", "got 1")),
        (("--experts", 0), ("--experts", "at least 2")),
        (("--topk", 0), ("--topk", "between 1 and --experts")),
        (("--experts", 4, "--topk", 5), ("--topk", "(4)", "got 5")),
        (("--drop-ratio", 1.0), ("--drop-ratio",)),
        (("--noise", -1.0), ("--noise",)),
        (("--max-shard-size", "huge"), ("huge", "5GB")),
    ],
)
def test_bad_options(tmp_path: Path, tiny_llama: Path, capsys, options, needles):
    output = tmp_path / "out"
    code = run_cli("upcycle", tiny_llama, "--output", output, *options)
    assert_one_line_error(capsys, code, *needles)
    assert not output.exists() and not leftovers(output)


def test_unknown_dtype_is_a_usage_error(tmp_path: Path, tiny_llama: Path, capsys):
    output = tmp_path / "out"
    code = run_cli("upcycle", tiny_llama, "--output", output, "--dtype", "float8")
    captured = capsys.readouterr()
    assert code == 2
    assert "--dtype" in captured.err and "float8" in captured.err and "bfloat16" in captured.err
    assert "Traceback" not in captured.err + captured.out
    assert not output.exists() and not leftovers(output)


def test_hub_id_without_the_hub(tmp_path: Path, capsys, monkeypatch):
    import huggingface_hub.constants as hub

    # huggingface_hub reads its environment once, at import: patch the values it already read.
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hf"))  # an empty cache
    output = tmp_path / "out"
    code = run_cli("upcycle", "nobody-here/no-such-model", "--output", output)
    assert_one_line_error(capsys, code, "nobody-here/no-such-model", "Hub", "local folder")
    assert not output.exists() and not leftovers(output)


def test_output_is_an_existing_file(tmp_path: Path, tiny_llama: Path, capsys):
    output = tmp_path / "out"
    output.write_text("precious")
    code = run_cli("upcycle", tiny_llama, "--output", output, "--overwrite")
    assert_one_line_error(capsys, code, str(output), "existing file")
    assert output.read_text() == "precious" and not leftovers(output)


def test_non_empty_output_needs_overwrite(tmp_path: Path, tiny_llama: Path, capsys):
    output = tmp_path / "out"
    output.mkdir()
    (output / "old.txt").write_text("old")
    code = run_cli("upcycle", tiny_llama, "--experts", 2, "--topk", 1, "--output", output)
    assert_one_line_error(capsys, code, "not empty", "--overwrite")
    assert snapshot(output) == {"old.txt": b"old"} and not leftovers(output)
    # With --overwrite the folder is replaced: the old file is gone, the model is there.
    assert run_cli("upcycle", tiny_llama, "--experts", 2, "--topk", 1, "--output", output, "--overwrite") == 0
    assert not (output / "old.txt").exists()
    assert {"config.json", "model.safetensors", "moeify.json", "README.md"} <= {p.name for p in output.iterdir()}
    assert json.loads((output / "config.json").read_text())["num_local_experts"] == 2
    assert not leftovers(output)


def test_empty_output_folder_is_used(tmp_path: Path, tiny_llama: Path):
    output = tmp_path / "out"
    output.mkdir()
    assert run_cli("upcycle", tiny_llama, "--experts", 2, "--topk", 1, "--output", output) == 0
    assert (output / "model.safetensors").is_file() and not leftovers(output)


def cli_env() -> dict[str, str]:
    # A narrow terminal: the error must stay one line however long its paths are.
    return os.environ | {"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "COLUMNS": "40"}


def test_no_traceback_from_a_real_process(tmp_path: Path, tiny_llama: Path):
    """The installed console script prints one line and exits 2 on a failure deep in the conversion."""
    weights = tiny_llama / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    output = tmp_path / "out"
    script = shutil.which("moeify")
    assert script, "the moeify console script is not installed"
    command = [script, "upcycle", str(tiny_llama), "--experts", "4", "--topk", "2", "--output", str(output)]
    done = subprocess.run(command, capture_output=True, text=True, env=cli_env(), timeout=300)
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert "truncated" in lines[0] and str(weights) in lines[0]
    assert "Traceback" not in done.stderr and done.stdout == ""
    assert not output.exists() and not leftovers(output)


# ---------------------------------------------------------------------------- interruption


def interrupt_after_first_tensor(monkeypatch, error: BaseException = KeyboardInterrupt()):
    """Make the shard writer raise `error` (Ctrl-C by default) when asked for its second tensor.

    Returns what the staging folder held at that moment, to prove the interruption was mid-write.
    """
    seen: list[tuple[Path, list[str]]] = []
    write_shard = moeify.checkpoint._write_shard
    produced = 0

    def interrupted(path, shard, *rest):  # rest: the writer's sink and progress callback
        def wrap(tensor):
            def produce():
                nonlocal produced
                produced += 1
                if produced == 2:
                    seen.append((path.parent, sorted(p.name for p in path.parent.iterdir())))
                    raise error
                return tensor.produce()
            return dataclasses.replace(tensor, produce=produce)

        return write_shard(path, [wrap(t) for t in shard], *rest)

    monkeypatch.setattr(moeify.checkpoint, "_write_shard", interrupted)
    return seen


def test_interrupted_conversion_leaves_nothing(tmp_path: Path, tiny_llama: Path, monkeypatch):
    seen = interrupt_after_first_tensor(monkeypatch)
    output = tmp_path / "out"
    code = run_cli("upcycle", tiny_llama, "--experts", 4, "--topk", 2, "--output", output)
    assert code != 0
    (staging, files), = seen
    assert staging.name.startswith(".out.moeify-") and files == ["model.safetensors"]  # interrupted mid-shard
    assert not staging.exists() and not output.exists() and not leftovers(output)


def test_failed_write_leaves_nothing(tmp_path: Path, tiny_llama: Path, monkeypatch, capsys):
    """Any failure, not only Ctrl-C: here the disk fills up halfway through the first shard."""
    seen = interrupt_after_first_tensor(monkeypatch, OSError(28, "No space left on device"))
    output = tmp_path / "out"
    capsys.readouterr()
    code = run_cli("upcycle", tiny_llama, "--experts", 4, "--topk", 2, "--output", output)
    err = capsys.readouterr().err.strip()
    assert code == 1 and err.count("\n") == 0 and "No space left on device" in err and "Traceback" not in err
    assert len(seen) == 1 and not seen[0][0].exists()
    assert not output.exists() and not leftovers(output)


def test_interrupted_overwrite_keeps_the_old_output(tmp_path: Path, tiny_llama: Path, monkeypatch):
    output = tmp_path / "out"
    assert run_cli("upcycle", tiny_llama, "--experts", 2, "--topk", 1, "--output", output) == 0
    before = snapshot(output)
    seen = interrupt_after_first_tensor(monkeypatch)
    code = run_cli("upcycle", tiny_llama, "--experts", 4, "--topk", 2, "--output", output, "--overwrite",
                   "--max-shard-size", "100KB")
    assert code != 0 and len(seen) == 1
    assert snapshot(output) == before and not leftovers(output)


# Runs the real CLI in a child process whose writer is slowed down (a pause per tensor), so a
# signal reliably arrives while shards are being written.
SLOW_CLI = """
import sys, time, dataclasses
import moeify.checkpoint as c
write_shard = c._write_shard
def slow(t):
    def produce():
        time.sleep(0.02)
        return t.produce()
    return dataclasses.replace(t, produce=produce)
c._write_shard = lambda path, shard, *rest: write_shard(path, [slow(t) for t in shard], *rest)
from moeify.cli import main
sys.argv[0] = "moeify"
main()
"""


@pytest.mark.parametrize("signum, existing", [(signal.SIGINT, False), (signal.SIGTERM, True)])
def test_signal_mid_write_leaves_nothing(tmp_path: Path, tiny_llama: Path, signum: int, existing: bool):
    output = tmp_path / "out"
    if existing:
        assert run_cli("upcycle", tiny_llama, "--experts", 2, "--topk", 1, "--output", output) == 0
    before = snapshot(output) if existing else None
    # 3 layers x 16 experts x 3 matrices + the rest: ~160 tensors, over 3 s of writing.
    command = [sys.executable, "-c", SLOW_CLI, "upcycle", str(tiny_llama), "--experts", "16", "--topk", "2",
               "--output", str(output), "--max-shard-size", "500KB"] + (["--overwrite"] if existing else [])
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env())
    try:
        deadline = time.monotonic() + 120
        shards: list[Path] = []
        while time.monotonic() < deadline and child.poll() is None:
            shards = [s for staging in leftovers(output) for s in staging.glob("*.safetensors")]
            if len(shards) >= 2:  # the first shard is complete, the second is being written
                break
            time.sleep(0.02)
        assert child.poll() is None and len(shards) >= 2, "the conversion ended before it could be interrupted"
        child.send_signal(signum)
        _, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 128 + signum  # the shell's code for a command the signal ended
    assert "Traceback" not in err, err
    assert [line for line in err.splitlines() if line.strip()][-1] == (
        "error: interrupted: nothing was written and any earlier output is as it was; run the command again"), err
    assert not leftovers(output)
    if existing:
        assert snapshot(output) == before
    else:
        assert not output.exists()



# ---------------------------------------------------------------------------- errors that name the next step


def test_upcycling_a_moe_says_split_or_expand(tmp_path: Path, tiny_llama: Path, capsys):
    moe = tmp_path / "mixtral"
    assert run_cli("upcycle", tiny_llama, "--experts", 2, "--format", "native", "--output", moe) == 0
    assert json.loads((moe / "config.json").read_text())["model_type"] == "mixtral"
    capsys.readouterr()
    output = tmp_path / "out"
    code = run_cli("upcycle", moe, "--experts", 4, "--output", output)
    assert_one_line_error(capsys, code, "mixtral checkpoint is already a MoE", "`moeify split`", "`moeify expand`")
    assert not output.exists() and not leftovers(output)


def test_a_bin_only_folder_says_how_to_convert(tmp_path: Path, tiny_llama: Path, capsys):
    import torch
    from safetensors.torch import load_file

    folder = tmp_path / "bin-llama"
    folder.mkdir()
    shutil.copy(tiny_llama / "config.json", folder)
    torch.save(load_file(tiny_llama / "model.safetensors"), folder / "pytorch_model.bin")
    capsys.readouterr()
    output = tmp_path / "out"
    code = run_cli("upcycle", folder, "--output", output)
    line = assert_one_line_error(capsys, code, ".bin weights only", "save_pretrained('bin-llama-safetensors')",
                                 "pass bin-llama-safetensors")
    assert f"from_pretrained('{folder}')" in line
    assert not output.exists() and not leftovers(output)


def test_too_little_disk_space_is_one_line_before_anything_is_written(tmp_path: Path, capsys, monkeypatch):
    """The filesystem's free space is read once the plan's size is known: short of it, nothing is written."""
    tiny = make_tiny("llama", tmp_path / "tiny")
    output = tmp_path / "out"
    free = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: free._replace(free=10 * 2**20))  # 10 MB free
    written = []
    monkeypatch.setattr(moeify.checkpoint, "_write_shard", lambda *args: written.append(args))
    capsys.readouterr()  # the fixture's own save_pretrained output
    code = run_cli("upcycle", tiny, "--experts", "4", "--topk", "2", "--output", output)
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1, captured.err
    assert lines[0].startswith("error: not enough disk space") and "MB free" in lines[0], lines[0]
    assert "Traceback" not in captured.err
    assert written == [] and not output.exists() and leftovers(output) == []
