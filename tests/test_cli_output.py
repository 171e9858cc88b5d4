"""What a person sees: results on stdout, messages on stderr, help with examples, one-line usage errors."""

from __future__ import annotations

import json
import subprocess

import pytest
from typer.testing import CliRunner

from moeify import cli
from tests.test_verify import source, trained, upcycled  # noqa: F401  (module-scoped fixtures)

COMMANDS = ["upcycle", "split", "merge", "expand", "models", "inspect", "apply", "push", "verify", "train"]


def test_results_on_stdout_and_usage_error_is_one_line():
    listed = subprocess.run(["moeify", "models"], capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0 and "qwen3-0.6b" in listed.stdout and listed.stderr == ""
    wrong = subprocess.run(["moeify", "split", "x", "--bogus"], capture_output=True, text=True, timeout=120)
    assert wrong.returncode == 2 and wrong.stdout == ""
    assert wrong.stderr.strip().splitlines() == ["error: No such option: --bogus (see `moeify --help`)"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_help_has_examples(command):
    result = CliRunner().invoke(cli.app, [command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "Example" in result.output and f"moeify {command} " in result.output


@pytest.mark.parametrize("command", ["upcycle", "split", "inspect", "verify"])
def test_flags_are_shown_without_bool(command):
    result = CliRunner().invoke(cli.app, [command, "--help"], env={"COLUMNS": "200"})
    # Typer's own --help option still shows <bool>; it has no public setting for it
    assert [line for line in result.output.splitlines() if "<bool>" in line and "--help" not in line] == []


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith("moeify ")


def test_verify_json_without_threshold_has_no_verdict(source, upcycled, capsys):  # noqa: F811
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        cli.main(["verify", str(source), str(upcycled), "--tokens", "64", "--json"])
    assert exit_.value.code == 0
    data = json.loads(capsys.readouterr().out)
    assert "passed" not in data and "max_ppl_ratio" not in data and data["ppl_ratio"] == pytest.approx(1.0, abs=1e-5)
