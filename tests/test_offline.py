"""Without the Hub: one probe per run, then one line within seconds, no retry log; typos in paths are paths."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moeify import source as sources
from tests.fixtures import make_tiny, run_cli

REPO = Path(__file__).resolve().parent.parent
# What huggingface_hub prints while it retries an unreachable Hub.
NOISE = ("retry", "Retrying", "HTTP", "Traceback", "WARNING", "timed out")


@pytest.fixture
def silent_endpoint():
    """A Hub endpoint that accepts connections and never answers: the worst network (a black hole)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(64)
        yield f"http://127.0.0.1:{server.getsockname()[1]}"


@pytest.fixture
def unreachable_env(tmp_path, silent_endpoint) -> dict[str, str]:
    """No HF_HUB_OFFLINE, an empty Hub cache, and an endpoint that never answers."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    return env | {"HF_ENDPOINT": silent_endpoint, "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(REPO),
                  "COLUMNS": "100", "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}


def timed(env: dict[str, str], *args: object) -> tuple[float, subprocess.CompletedProcess]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "moeify", *map(str, args)], capture_output=True, text=True,
                          env=env, stdin=subprocess.DEVNULL, timeout=300)
    return time.perf_counter() - started, done


def quiet(stderr: str) -> bool:
    return not any(word in stderr for word in NOISE)


@pytest.mark.parametrize("command", ["inspect", "upcycle"])
def test_unreachable_hub_is_one_line_about_as_fast_as_a_local_folder(command, tmp_path, unreachable_env):
    env = unreachable_env
    local = make_tiny("llama", tmp_path / "tiny")
    extra = ("--experts", 2, "--topk", 1, "--output") if command == "upcycle" else ()
    local_seconds, done = timed(env, command, local, *extra, *([tmp_path / "a"] if extra else []))
    assert done.returncode == 0, done.stderr
    hub_seconds, done = timed(env, command, "mistral-7b", *extra, *([tmp_path / "b"] if extra else []))
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1, done.stderr  # MoeifyFailure: the network, not the input
    assert lines[0].startswith("error: cannot fetch") and "mistralai/Mistral-7B-v0.1" in lines[0]
    assert "unreachable" in lines[0] and quiet(done.stderr)
    # One probe (PROBE_SECONDS at most), then the local cache answers at once; before: ~23 s of retries.
    assert hub_seconds - local_seconds < sources.PROBE_SECONDS + 3, (hub_seconds, local_seconds)
    assert not (tmp_path / "b").exists()


def test_unreachable_hub_falls_back_for_the_demo_alias_quietly(smollm2, unreachable_env):
    env = unreachable_env
    local_seconds, done = timed(env, "inspect", smollm2)
    assert done.returncode == 0, done.stderr
    alias_seconds, done = timed(env, "inspect", "smollm2-135m")
    assert done.returncode == 0, done.stderr
    assert "is not available offline; using the copy (Q4_1 GGUF, dequantized)" in done.stderr and quiet(done.stderr)
    assert alias_seconds - local_seconds < sources.PROBE_SECONDS + 3, (alias_seconds, local_seconds)


def test_hf_hub_offline_is_one_line_naming_it(capsys):
    assert run_cli("inspect", "someone/not-cached-anywhere") == 2  # conftest sets HF_HUB_OFFLINE
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "HF_HUB_OFFLINE is set" in lines[0] and "local folder" in lines[0]


def test_one_probe_per_run(monkeypatch):
    import huggingface_hub.constants as hub

    probes = []
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(sources, "_reach", None)
    monkeypatch.setattr(sources, "_probe", lambda endpoint: probes.append(endpoint) or False)
    assert sources.hub_reach() is sources.Reach.UNREACHABLE
    assert sources.hub_reach() is sources.Reach.UNREACHABLE
    assert probes == [hub.ENDPOINT] and hub.HF_HUB_OFFLINE is True  # huggingface_hub now answers from its cache


@pytest.mark.parametrize("args", [("inspect", "./my-lama"), ("upcycle", "./my-lama", "--output", "OUT"),
                                  ("split", "../my-lama", "--output", "OUT"), ("verify", "./my-lama", "./my-lama-moe"),
                                  ("inspect", "~/no-such-model-here")])
def test_mistyped_local_path_is_no_such_folder(args, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = run_cli(*[str(tmp_path / "out") if a == "OUT" else a for a in args])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"error: no such folder: {args[1]}") and "Hub" not in lines[0]
    assert not (tmp_path / "out").exists()
