"""Hostile and careless input: numbers in specs and recipes, YAML, and text files for calibration or verify.

Each case runs the CLI as a user would and checks the exit code (2), the one `error:` line, and
that nothing was written: the folder holds exactly what the test put there.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from moeify import calibration, recipe, text, verify
from moeify.adapters import adapter_for
from moeify.errors import MoeifyError
from moeify.spec import MAX_EXPERTS, Spec
from tests.fixtures import make_tiny, run_cli
from tests.test_split import add_char_tokenizer

PROSE = "The quick brown fox jumps over the lazy dog while the cat sleeps by the fire.\n"


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return make_tiny("llama", tmp_path_factory.mktemp("inputs") / "llama")


def refused(capsys, *args: object) -> str:
    """Run `moeify ARGS` expecting exit 2 and exactly one `error:` line (no traceback, nothing on stdout)."""
    capsys.readouterr()
    code = run_cli(*args)
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert out == "" and "Traceback" not in err
    return lines[0]


def assert_only(folder: Path, *names: str) -> None:
    """The folder holds exactly these entries: no output, nothing hidden beside it."""
    assert sorted(p.name for p in folder.iterdir()) == sorted(names)


# ---------------------------------------------------------------------------- numbers on the command line


@pytest.mark.parametrize("options, message", [
    (("--noise", "nan"), "--noise must be a finite number (got nan)"),
    (("--router-std", "inf"), "--router-std must be a finite number (got inf)"),
    (("--drop-ratio", "nan"), "--drop-ratio must be a finite number (got nan)"),
    (("--noise", "1000"), "--noise must be at most 100 (got 1000"),
    (("--experts", "1000000000"), f"--experts must be at most {MAX_EXPERTS} (got 1000000000)"),
    (("--experts", "2048", "--granularity", "16"), "this spec makes 32768 experts per MoE layer (2048 x granularity 16)"),
    (("--experts", "16384", "--shared-experts", "1"), "16385 experts per MoE layer (16384 x granularity 1 + 1 shared)"),
    (("--seed", "-1"), "--seed must be between 0 and 9223372036854775807 (got -1)"),
    (("--seed", str(2**64)), "--seed must be at most 9223372036854775807"),
    (("--max-shard-size", "9" * 400 + "GB"), "--max-shard-size must be at most 1TB"),
])
def test_bad_numbers_on_the_command_line(source, tmp_path, capsys, options, message):
    line = refused(capsys, "upcycle", source, "--output", tmp_path / "out", *options)
    assert message in line
    assert_only(tmp_path)


# ---------------------------------------------------------------------------- numbers and YAML in recipes


def billion_laughs(levels: int) -> str:
    """A YAML alias bomb in a known field: 9**levels strings from a few lines."""
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join(lines + [f"moe_layers: *l{levels - 1}"]) + "\n"


@pytest.mark.parametrize("body, message", [
    ("noise: .nan\n", "--noise must be a finite number (got nan)"),
    ("router_std: .inf\n", "--router-std must be a finite number (got inf)"),
    ("router_std: 1.0e+400\n", "--router-std must be a finite number (got inf)"),
    ("noise: " + "9" * 400 + "\n", "--noise must be at most 100 (got a number over 10**300)"),
    ("experts: 1000000000\n", f"--experts must be at most {MAX_EXPERTS} (got 1000000000)"),
    ("granularity: 1000000000\n", f"--granularity must be at most {MAX_EXPERTS}"),
    ("shared_experts: 1000000000\n", f"--shared-experts must be at most {MAX_EXPERTS}"),
    ("experts: 8.0\n", "recipe field experts must be a whole number (got 8.0)"),
    ("seed: 1.5\n", "recipe field seed must be a whole number (got 1.5)"),
    ("seed: " + "9" * 5000 + "\n", "cannot read recipe"),
    ("mode: split\ngranularity: 4\ntopk: 2\ncalibration_tokens: 1000000000\n",
     "--calibration-tokens must be at most 1048576 (got 1000000000)"),
    ("calibration: 5\nmode: split\ngranularity: 4\ntopk: 2\n", "calibration must be a file path or a datasets name"),
    ("max_shard_size: 2TB\n", "--max-shard-size must be at most 1TB (got '2TB')"),
    (billion_laughs(6), "found the alias *l0 on line 2; recipes do not use YAML anchors and aliases"),
    ("base: &base 4\nexperts: *base\n", "found the alias *base on line 2"),
    ("experts: " + "[" * 50000 + "\n", "nested too deeply"),
    ("experts: !!python/object/apply:os.system ['touch pwned']\n", "could not determine a constructor"),
])
def test_bad_recipe(source, tmp_path, capsys, body, message):
    (tmp_path / "bad.yaml").write_text(body)
    line = refused(capsys, "apply", tmp_path / "bad.yaml", source, "--output", tmp_path / "out")
    assert message in line and len(line) < 300, line
    assert_only(tmp_path, "bad.yaml")


def test_recipe_of_two_megabytes_is_refused_unread(source, tmp_path, capsys):
    (tmp_path / "big.yaml").write_text("# padding\n" * 200_000 + "experts: 4\n")
    line = refused(capsys, "apply", tmp_path / "big.yaml", source, "--output", tmp_path / "out")
    assert "is over 1 MiB; a recipe is a few lines" in line
    assert_only(tmp_path, "big.yaml")


def test_binary_recipe(source, tmp_path, capsys):
    (tmp_path / "bad.yaml").write_bytes(b"experts: \xff\xfe\n")
    line = refused(capsys, "apply", tmp_path / "bad.yaml", source, "--output", tmp_path / "out")
    assert "is not UTF-8 text" in line
    assert_only(tmp_path, "bad.yaml")


@pytest.mark.parametrize("pair, message", [
    ("noise=.nan", "--noise must be a finite number (got nan)"),
    ("experts=[1", "cannot read --set 'experts=[1'"),
    ("experts=*a", "found the alias *a"),
])
def test_bad_set_override(source, tmp_path, capsys, pair, message):
    line = refused(capsys, "apply", "mixtral", source, "--output", tmp_path / "out", "--set", pair)
    assert message in line
    assert_only(tmp_path)


def test_moeify_json_replay_still_reads_numbers_as_before(tmp_path):
    record = Spec(experts=4, topk=2, noise=0.01, seed=7).to_dict() | {"source": "x", "total_params": 1}
    (tmp_path / "moeify.json").write_text(json.dumps(record))
    spec = recipe.load(tmp_path / "moeify.json")
    assert spec == Spec(experts=4, topk=2, noise=0.01, seed=7)
    assert recipe.spec_of({"noise": 1}).to_dict()["noise"] == 1.0  # a float, as the record writes it


# ---------------------------------------------------------------------------- text files


def binary(path: Path) -> Path:
    path.write_bytes(os.urandom(4096) + b"\0" * 16)
    return path


@pytest.mark.parametrize("name, content, reason", [
    ("weights.bin", None, "it contains NUL bytes"),
    ("notes.txt", "Le café était très bon.\n".encode("latin-1") * 50, "it is not UTF-8"),
    ("notes.txt", "hello\n".encode("utf-16") * 50, "it contains NUL bytes"),
    ("notes.txt", b"\x01\x02\x03\x04 a" * 500, "it is full of control characters"),
])
def test_verify_refuses_a_file_that_is_not_text(source, tmp_path, capsys, name, content, reason):
    path = binary(tmp_path / name) if content is None else tmp_path / name
    if content is not None:
        path.write_bytes(content)
    line = refused(capsys, "verify", source, source, "--text", path)
    assert line == f"error: {path} is not a text file ({reason}); pass a UTF-8 text file to --text"
    assert_only(tmp_path, name)


@pytest.mark.parametrize("name", ["calibration.bin", "calibration.txt", "calibration.jsonl"])
def test_split_refuses_binary_calibration(source, tmp_path, capsys, name):
    path = binary(tmp_path / name)
    line = refused(capsys, "split", source, "--granularity", 4, "--calibration", path, "--output", tmp_path / "out")
    assert line.startswith(f"error: {path} is not a text file (")
    assert line.endswith("; pass a UTF-8 text file to --calibration")
    assert_only(tmp_path, name)


def test_only_the_prefix_a_caller_needs_is_read(tmp_path):
    # Prose, then binary: a reader that looked past the prefix it needs would refuse the file.
    path = tmp_path / "big.txt"
    path.write_bytes(PROSE.encode() * 1000 + b"\0" * 10_000)
    assert verify.load_text(path, tokens=100) == (PROSE * 1000)[:6400]
    assert calibration.read_texts(str(path), tokens=100) == [(PROSE * 1000)[:1600]]
    with pytest.raises(MoeifyError, match="contains NUL bytes"):
        verify.load_text(path)  # asked for everything: the binary tail is seen


def test_calibration_reads_only_what_its_token_budget_can_use(tmp_path):
    llama = add_char_tokenizer(make_tiny("llama", tmp_path / "llama"))
    path = tmp_path / "notes.txt"
    path.write_bytes(PROSE.encode() * 100 + b"\0" * 1000)  # 7900 characters of prose, then binary
    # One token a character: 100 tokens read 1600 characters (6400 bytes at most), never the NUL bytes.
    stats = calibration.collect(llama, adapter_for({"model_type": "llama"}), [0], str(path), 100, 0,
                                coactivation=False)
    assert stats[0].tokens == 100


def test_no_file_is_read_past_max_bytes(tmp_path, monkeypatch):
    monkeypatch.setattr(text, "MAX_BYTES", 4000)
    path = tmp_path / "big.txt"
    path.write_bytes(PROSE.encode() * 100 + b"\0" * 10_000)
    assert verify.load_text(path) == (PROSE * 100)[:4000]
    line = json.dumps({"text": PROSE}) + "\n"
    (tmp_path / "big.jsonl").write_bytes(line.encode() * 100 + b"\0" * 10_000)
    assert text.read_jsonl(tmp_path / "big.jsonl", "--calibration") == [PROSE] * (4000 // len(line))
    (tmp_path / "long.jsonl").write_text(json.dumps({"text": PROSE * 100}) + "\n")
    with pytest.raises(MoeifyError, match="line 1 is over .*; put one document per line"):
        text.read_jsonl(tmp_path / "long.jsonl", "--calibration")


def test_jsonl_is_streamed_up_to_the_characters_asked_for(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": f"document {i}. " + PROSE}) + "\n" for i in range(50)) + "not json\n")
    texts = text.read_jsonl(path, "--calibration", chars=200)
    assert "".join(texts) == "".join(f"document {i}. " + PROSE for i in range(50))[:200]  # the bad line is never read
    with pytest.raises(MoeifyError, match="line 51 is not a JSON object"):
        text.read_jsonl(path, "--calibration")


def test_a_character_cut_by_the_prefix_is_not_undecodable(tmp_path):
    path = tmp_path / "accents.txt"
    path.write_text("é" * 10_000)  # two bytes each: a prefix of 4 * chars bytes may end mid-character
    assert text.read_plain(path, "--text", chars=3) == "ééé"
    assert text.read_plain(path, "--text") == "é" * 10_000
