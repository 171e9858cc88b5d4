"""What a person sees: results on stdout, messages on stderr, help with examples, one-line usage errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from moeify import cli
from tests.fixtures import make_tiny, run_cli
from tests.test_split import add_char_tokenizer
from tests.test_train import models, train  # noqa: F401  (module-scoped fixture)
from tests.test_verify import source, trained, upcycled  # noqa: F401  (module-scoped fixtures)

COMMANDS = [c.name or c.callback.__name__ for c in cli.app.registered_commands]  # every command, as wired


def test_results_on_stdout_and_usage_error_is_one_line():
    listed = subprocess.run(["moeify", "models"], capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0 and "qwen3-0.6b" in listed.stdout and listed.stderr == ""
    wrong = subprocess.run(["moeify", "split", "x", "--bogus"], capture_output=True, text=True, timeout=120)
    assert wrong.returncode == 2 and wrong.stdout == ""
    assert wrong.stderr.strip().splitlines() == ["error: No such option: --bogus (see `moeify split --help`)"]
    bad = subprocess.run(["moeify", "upcycle", "x", "--dtype", "bf16"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [  # the command's own help; no pydantic words
        "error: Invalid value for '--dtype': 'bf16' is not one of 'auto', 'float32', 'bfloat16', 'float16'. "
        "(see `moeify upcycle --help`)"]
    top = subprocess.run(["moeify", "--bogus"], capture_output=True, text=True, timeout=120)
    assert top.stderr.strip().splitlines() == ["error: No such option: --bogus (see `moeify --help`)"]


def test_every_command_is_walked():
    assert set(COMMANDS) >= {"upcycle", "split", "merge", "peer", "expand", "models", "inspect", "apply", "push",
                              "verify", "train"}


def help_of(*command: str) -> str:
    result = CliRunner().invoke(cli.app, [*command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    return result.output


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_help_has_examples(command):
    shown = help_of(command)
    examples = shown.split("Examples:" if "Examples:" in shown else "Example:", 1)[1]
    assert f"moeify {command} " in examples


@pytest.mark.parametrize("command", [[], *([c] for c in COMMANDS)], ids=lambda c: " ".join(c) or "moeify")
def test_flags_are_shown_without_bool(command):
    assert [line for line in help_of(*command).splitlines() if "<bool>" in line] == []


@pytest.mark.parametrize("command", [[], *([c] for c in COMMANDS)], ids=lambda c: " ".join(c) or "moeify")
def test_usage_line_is_clean(command):
    usage = next(line for line in help_of(*command).splitlines() if "Usage:" in line)
    assert not any(mark in usage for mark in ("{", "}", "[[", "]]")), usage


def test_usage_lines_name_arguments_plainly():
    usages = {c: next(line.strip() for line in help_of(c).splitlines() if "Usage:" in line) for c in COMMANDS}
    assert usages["split"] == "Usage: moeify split [OPTIONS] SOURCE"
    assert usages["apply"] == "Usage: moeify apply [OPTIONS] RECIPE [SOURCE]"
    assert usages["verify"] == "Usage: moeify verify [OPTIONS] SOURCE CONVERTED"
    assert usages["models"] == "Usage: moeify models [OPTIONS]"


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


# ---------------------------------------------------------------------------- results on stdout, for every command


def run(capsys, *args: object) -> tuple[str, str]:
    """stdout and stderr of `moeify ARGS`, which must succeed."""
    capsys.readouterr()
    assert run_cli(*args) == 0
    captured = capsys.readouterr()
    return captured.out, captured.err


@pytest.fixture
def here(tmp_path: Path, monkeypatch) -> Path:
    """Outputs named relative to tmp_path: a summary's title (the output path) then fits on one line."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def assert_summary_on_stdout(out: str, err: str, output: str) -> None:
    assert output in out and "parameters" in out  # the summary table
    assert output not in err and "parameters" not in err


def test_peer_summary_on_stdout(tiny_llama: Path, here: Path, capsys):
    out, err = run(capsys, "peer", tiny_llama, "--output", "peer")
    assert_summary_on_stdout(out, err, "peer")


def test_merge_summary_and_routing_on_stdout(tiny_llama: Path, here: Path, capsys):
    out, err = run(capsys, "merge", tiny_llama, "--expert", tiny_llama, "--expert", tiny_llama,
                   "--output", "merged")
    assert_summary_on_stdout(out, err, "merged")


def test_expand_summary_and_step_zero_on_stdout(tiny_llama: Path, here: Path, capsys):
    run(capsys, "upcycle", tiny_llama, "--experts", 2, "--format", "remote", "--output", "moe")
    out, err = run(capsys, "expand", "moe", "--add", 1, "--from", "copy:0", "--output", "grown")
    assert_summary_on_stdout(out, err, "grown")
    assert "step 0: exact by construction" in out and "step 0" not in err
    add_char_tokenizer(here / "moe")  # copy:busiest loads the model and runs it on text to find the busiest
    _, err = run(capsys, "expand", "moe", "--add", 1, "--output", "busiest")
    assert "Loading weights" not in err and "busiest" not in err  # no bars from transformers


def test_push_dry_run_table_on_stdout(tiny_llama: Path, here: Path, capsys):
    run(capsys, "upcycle", tiny_llama, "--experts", 2, "--output", "moe")
    out, err = run(capsys, "push", "moe", "--repo-id", "me/moe", "--dry-run")
    assert "would upload to me/moe" in out and "moeify.json" in out and err == ""


def test_train_summary_on_stdout(models, here: Path, capsys):  # noqa: F811
    capsys.readouterr()
    assert train(models["remote"], "trained", "--steps", 1) == 0
    captured = capsys.readouterr()
    assert "trained" in captured.out and "held-out perplexity" in captured.out
    assert "held-out perplexity" not in captured.err


# ---------------------------------------------------------------------------- verify's expert-load table at 80 columns


@pytest.mark.parametrize("experts", [8, 16])
def test_verify_load_table_fits_80_columns(source, tmp_path: Path, experts: int):  # noqa: F811
    """A real `moeify verify` in a child process at COLUMNS=80: no line is wider, and no table row wraps
    (each MoE layer is one line). Beyond 8 experts each layer is summarised: median, busiest, idlest."""
    from moeify.conversion import convert
    from moeify.spec import Spec

    moe = tmp_path / f"moe{experts}"
    convert(source, moe, Spec(experts=experts, topk=2, noise=0.05), source=str(source))
    shown = subprocess.run(["moeify", "verify", str(source), str(moe), "--tokens", "64"], capture_output=True,
                           text=True, timeout=600, env=os.environ | {"COLUMNS": "80"})
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert max(map(len, lines)) <= 80
    layers = json.loads((moe / "config.json").read_text())["num_hidden_layers"]
    rows = [line for line in lines if re.match(r"^│? *\d+ +│.*%", line)]  # one line per MoE layer
    assert len(rows) == layers
    if experts > 8:
        header = next(line for line in lines if "median" in line)
        assert all(word in header for word in ("min", "max", "busiest", "idlest", "peak"))


# ---------------------------------------------------------------------------- the summary's exactness claim


EXACT = "holds this conversion exactly"


@pytest.mark.parametrize("options, change", [
    (["--noise", "0.01"], "--noise 0.01 perturbs every expert copy"),
    (["--drop-ratio", "0.5"], "--drop-ratio 0.5 re-initialises 50% of each expert's neurons"),
])
def test_lossy_options_are_not_called_exact(tiny_llama: Path, here: Path, capsys, options, change):
    out, err = run(capsys, "upcycle", tiny_llama, "--experts", 2, *options, "--output", "moe")
    assert EXACT not in out and "not exact" in out and change in " ".join(out.split())
    assert "note:" not in err


def test_exact_conversion_says_so(tiny_llama: Path, here: Path, capsys):
    out, err = run(capsys, "upcycle", tiny_llama, "--experts", 2, "--output", "moe")
    assert EXACT in out and "not exact" not in out and "note:" not in err


@pytest.mark.parametrize("dtype, narrowed", [("float16", True), ("float32", False), ("bfloat16", False)])
def test_dtype_narrowing_is_said(tmp_path: Path, here: Path, capsys, dtype: str, narrowed: bool):
    import torch

    source = make_tiny("llama", tmp_path / "bf16-llama", dtype=torch.bfloat16)
    out, err = run(capsys, "upcycle", source, "--experts", 2, "--dtype", dtype, "--output", "moe")
    notes = [line for line in err.splitlines() if line.startswith("note:")]
    if narrowed:
        assert notes == ["note: --dtype float16 narrows the source's bfloat16 weights (they round to float16's "
                         "precision and range): the output is close to the source, not equal; --dtype auto keeps "
                         "them exactly"]
        assert EXACT not in out and "bfloat16 -> float16" in out
    else:  # a widening or the same dtype changes no value
        assert notes == [] and EXACT in out


def test_a_shell_run_collects_rarely_and_still_runs_exit_handlers():
    """From a shell the cycle collector runs rarely and freezes what is left before exit (the final
    scan of torch's and transformers' objects took ~1.6 s); exit handlers still run."""
    script = ("import atexit, gc, sys\n"
              "from moeify import cli\n"
              "atexit.register(lambda: print('exit handler', gc.get_threshold(), gc.get_freeze_count() > 0))\n"
              "sys.argv = ['moeify', 'models']\n"
              "cli.main()\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "exit handler (50000, 20, 20) True" in done.stdout


def test_in_process_runs_keep_pythons_collector(capsys):
    import gc

    before = gc.get_threshold()
    assert run_cli("models") == 0
    assert gc.get_threshold() == before
