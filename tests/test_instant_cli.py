"""`moeify --help`, every `moeify CMD --help`, `moeify models` and `moeify inspect` of a local folder (with
conversion options too) run without torch, transformers or huggingface_hub (help and models without pydantic
either, which Typer imports to coerce a value): a real child process in which importing any of them raises
ImportError."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moeify import cli
from tests.fixtures import make_tiny

COMMANDS = [c.name or c.callback.__name__ for c in cli.app.registered_commands]

HEAVY = ("torch", "transformers", "huggingface_hub")
# Put first on the child's PYTHONPATH, this sitecustomize makes importing the packages in BLOCKED fail.
BLOCKER = '''
import os
import sys

class Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in os.environ["BLOCKED"].split(","):
            raise ImportError(f"{name} is blocked in this test: the command must not import it")

sys.meta_path.insert(0, Blocked())
'''


@pytest.fixture(scope="module")
def blocked_env(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("blocker")
    (folder / "sitecustomize.py").write_text(BLOCKER)
    path = os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return os.environ | {"PYTHONPATH": path, "COLUMNS": "200", "HF_HUB_OFFLINE": "1", "BLOCKED": ",".join(HEAVY)}


@pytest.fixture(scope="module")
def help_env(blocked_env) -> dict[str, str]:
    """Help and `models` parse no value: pydantic stays out too."""
    return blocked_env | {"BLOCKED": ",".join((*HEAVY, "pydantic"))}


def moeify(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moeify", *args], env=env, capture_output=True, text=True,
                          timeout=120)


def test_the_blocker_blocks(help_env):
    for module in (*HEAVY, "pydantic"):
        tried = subprocess.run([sys.executable, "-c", f"import {module}"], env=help_env, capture_output=True,
                               text=True, timeout=120)
        assert tried.returncode == 1 and "is blocked in this test" in tried.stderr


def test_help_without_torch(help_env):
    shown = moeify(help_env, "--help")
    assert shown.returncode == 0, shown.stderr
    assert all(command in shown.stdout for command in COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_command_help_without_torch(help_env, command):
    shown = moeify(help_env, command, "--help")
    assert shown.returncode == 0, shown.stderr
    assert f"Usage: moeify {command} [OPTIONS]" in shown.stdout


def test_models_without_torch(help_env):
    listed = moeify(help_env, "models")
    assert listed.returncode == 0, listed.stderr
    assert "smollm2-135m" in listed.stdout


def test_inspect_without_torch(blocked_env, tiny_llama: Path):
    shown = moeify(blocked_env, "inspect", str(tiny_llama))
    assert shown.returncode == 0, shown.stderr
    assert "llama (dense)" in shown.stdout and "3, hidden size 64" in shown.stdout
    report = moeify(blocked_env, "inspect", str(tiny_llama), "--json")
    assert report.returncode == 0, report.stderr
    assert json.loads(report.stdout)["num_layers"] == 3


@pytest.mark.parametrize("options", [("--experts", "4", "--topk", "2"), ("--granularity", "2", "--format", "remote"),
                                     ("--experts", "2", "--topk", "1", "--moe-layers", "0,2"),  # qwen2_moe
                                     ("--experts", "4", "--topk", "2", "--shared-experts", "1")])
def test_inspect_of_a_conversion_without_torch(blocked_env, tiny_llama: Path, options: tuple[str, ...]):
    """Which format would hold a conversion, and what it would weigh: arithmetic on config.json."""
    shown = moeify(blocked_env, "inspect", str(tiny_llama), *options)
    assert shown.returncode == 0, shown.stderr
    assert f"after upcycling ({' '.join(options)})" in shown.stdout and "conversion needs" in shown.stdout


@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3", "granite", "phi3"])
def test_inspect_of_a_conversion_without_torch_in_every_family(blocked_env, tmp_path: Path, family: str):
    """Each family's native targets (Mixtral, Qwen2/3-MoE, Granite-MoE) decide from config.json alone."""
    folder = make_tiny(family, tmp_path / family)
    for options in (("--experts", "4", "--topk", "2"), ("--experts", "4", "--topk", "2", "--shared-experts", "1")):
        shown = moeify(blocked_env, "inspect", str(folder), *options)
        assert shown.returncode == 0, shown.stderr
        assert "conversion needs" in shown.stdout


def test_a_conversion_still_needs_torch(blocked_env, tiny_llama: Path, tmp_path: Path):
    """The blocker is real: a command that converts fails on the blocked import, and writes nothing."""
    tried = moeify(blocked_env, "upcycle", str(tiny_llama), "--output", str(tmp_path / "out"))
    assert tried.returncode != 0 and "is blocked in this test" in tried.stderr
    assert not (tmp_path / "out").exists()


def test_defaults_written_out_match_the_library():
    """Two defaults are spelled out in the commands (their modules need torch); they must stay the library's."""
    import inspect

    from moeify import expand, verify
    from moeify.commands import expand as expand_command
    from moeify.commands import verify as verify_command

    assert inspect.signature(verify_command.verify).parameters["tokens"].default == verify.DEFAULT_TOKENS
    assert inspect.signature(expand_command.expand).parameters["from_"].default == expand.BUSIEST
