"""Whose code runs when moeify loads a folder: the folder's own Python only with --trust-remote-code.

Each hostile folder's module writes a marker file when imported, so "not run" is a file that
does not exist. moeify's own outputs are loaded with transformers' door to a folder's modules
locked (no_folder_code): any import of the folder's files would fail the run.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from moeify import trust
from moeify.conversion import convert
from moeify.spec import Format, Spec
from moeify.targets.remote import CODE_DIR, CODE_FILES
from tests.fixtures import make_tiny, run_cli
from tests.test_verify import with_tokenizer

TOKENS = "16"  # enough to run both models; the numbers are not what these tests are about


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return with_tokenizer(make_tiny("llama", tmp_path_factory.mktemp("trust") / "llama"))


@pytest.fixture(scope="module")
def remote(source: Path) -> Path:
    """A moeify remote-format output, carrying moeify's code as shipped."""
    out = source.parent / "remote"
    convert(source, out, Spec(experts=4, topk=2, format=Format.REMOTE), source=str(source))
    return out


def copy(folder: Path, to: Path) -> Path:
    return Path(shutil.copytree(folder, to))


def marker_line(marker: Path) -> str:
    return f"\nopen({str(marker)!r}, 'w').write('ran')\n"


def with_evil_model(folder: Path, marker: Path) -> Path:
    """A llama whose config.json asks for its own modeling file, which writes `marker` when imported."""
    (folder / "modeling_evil.py").write_text(
        "from transformers import LlamaForCausalLM\n" + marker_line(marker)
        + "\nclass EvilForCausalLM(LlamaForCausalLM):\n    pass\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def with_evil_tokenizer(folder: Path, marker: Path, tokenizer_class: str) -> Path:
    """A tokenizer_config.json whose auto_map names a tokenizer module that writes `marker` when imported."""
    (folder / "tokenization_evil.py").write_text(
        "from transformers import PreTrainedTokenizerFast\n" + marker_line(marker)
        + "\nclass EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config |= {"auto_map": {"AutoTokenizer": [None, "tokenization_evil.EvilTokenizer"]},
               "tokenizer_class": tokenizer_class}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


@pytest.fixture
def no_folder_code(monkeypatch):
    """transformers' one door to a folder's Python (get_class_from_dynamic_module), locked wherever it was imported."""
    import transformers  # noqa: F401  (its Auto modules are the ones that import the door)

    def locked(*args, **kwargs):
        raise AssertionError("a module of the folder was imported")

    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").startswith("transformers") and \
                hasattr(module, "get_class_from_dynamic_module"):
            monkeypatch.setattr(module, "get_class_from_dynamic_module", locked)


# ---------------------------------------------------------------------------- a folder's own code


@pytest.mark.parametrize("side", ["source", "converted"])
def test_folder_with_its_own_code_is_refused_without_the_flag(source, remote, tmp_path, capsys, side):
    marker = tmp_path / "marker"
    evil = with_evil_model(copy(source, tmp_path / "evil"), marker)
    pair = (evil, remote) if side == "source" else (source, evil)
    assert run_cli("verify", *pair, "--tokens", TOKENS) == 2
    err = one_error_line(capsys)
    assert f"{evil} ships its own Python (modeling_evil.py, named by config.json's auto_map)" in err
    assert "pass --trust-remote-code to run it" in err
    assert not marker.exists()


def test_trust_remote_code_runs_the_folders_code(source, tmp_path, monkeypatch, capsys):
    import transformers.dynamic_module_utils as dynamic

    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "hf-modules"))  # not the user's cache
    monkeypatch.syspath_prepend(str(tmp_path / "hf-modules"))
    marker = tmp_path / "marker"
    evil = with_evil_model(copy(source, tmp_path / "evil-trusted"), marker)
    assert run_cli("verify", source, evil, "--tokens", TOKENS, "--trust-remote-code", "--json") == 0
    assert marker.read_text() == "ran"  # the user asked for it
    assert json.loads(capsys.readouterr().out)["converted"]["name"] == str(evil)


# ---------------------------------------------------------------------------- moeify's own outputs


def test_moeify_output_verifies_without_the_flag_and_its_files_are_not_imported(source, remote, no_folder_code,
                                                                                capsys):
    assert run_cli("verify", source, remote, "--tokens", TOKENS, "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ppl_ratio"] == pytest.approx(1.0, abs=1e-5)  # moeify's classes computed the upcycle exactly
    assert report["converted"]["routing"] == {"experts": 4, "topk": 2, "shared": 0}


def test_moeify_output_with_changed_code_is_refused(source, remote, tmp_path, capsys):
    marker = tmp_path / "marker"
    changed = copy(remote, tmp_path / "changed")
    with (changed / "modeling_moeify.py").open("a") as f:
        f.write(marker_line(marker))
    assert run_cli("verify", source, changed, "--tokens", TOKENS) == 2
    err = one_error_line(capsys)
    assert "carries moeify's remote code (configuration_moeify.py, modeling_moeify.py) but not a version" in err
    assert "--trust-remote-code" in err
    assert not marker.exists()


def test_moeify_code_pointing_elsewhere_is_refused(source, remote, tmp_path, capsys):
    """Shipped files, but an auto_map naming another module beside them: not moeify's output any more."""
    marker = tmp_path / "marker"
    changed = with_evil_model(copy(remote, tmp_path / "changed"), marker)
    config = json.loads((changed / "config.json").read_text())
    config["auto_map"] |= {"AutoConfig": "configuration_moeify.MoeifyConfig"}
    (changed / "config.json").write_text(json.dumps(config))
    assert run_cli("verify", source, changed, "--tokens", TOKENS) == 2
    assert "modeling_evil.py" in one_error_line(capsys) and not marker.exists()


def test_moeify_output_built_by_moeifys_own_classes(remote, no_folder_code):
    from moeify.loading import Code, code_of, load_model

    assert code_of(remote) is Code.MOEIFY
    model = load_model(remote)
    assert type(model).__module__ == "moeify.targets.remote_code.modeling_moeify"


# ---------------------------------------------------------------------------- tokenizers


def test_tokenizer_that_is_only_its_own_code_is_refused(source, remote, tmp_path, capsys):
    marker = tmp_path / "marker"
    evil = with_evil_tokenizer(copy(source, tmp_path / "evil"), marker, "EvilTokenizer")
    assert run_cli("verify", evil, remote, "--tokens", TOKENS) == 2
    err = one_error_line(capsys)
    assert "tokenizer is its own Python (tokenization_evil.py, named by tokenizer_config.json's auto_map)" in err
    assert not marker.exists()


def test_tokenizer_auto_map_beside_a_known_class_is_not_executed(source, remote, tmp_path, capsys):
    marker = tmp_path / "marker"
    evil = with_evil_tokenizer(copy(source, tmp_path / "evil"), marker, "PreTrainedTokenizerFast")
    assert run_cli("verify", evil, remote, "--tokens", TOKENS) == 0  # transformers' own class reads it
    assert not marker.exists()


# ---------------------------------------------------------------------------- the list of shipped versions


def test_every_committed_version_of_the_remote_code_is_known():
    """An output written by any earlier moeify loads without the flag: each version's hash is listed."""
    root = Path(__file__).parents[1]
    for name in CODE_FILES:
        assert trust.sha256(CODE_DIR / name) in trust.known_hashes(name)
        path = f"moeify/targets/remote_code/{name}"
        log = subprocess.run(["git", "log", "--format=%H", "--", path], cwd=root, capture_output=True, text=True,
                             check=False)
        for commit in log.stdout.split():  # none outside a git checkout; a shallow clone has the latest
            text = subprocess.run(["git", "show", f"{commit}:{path}"], cwd=root, capture_output=True, check=True).stdout
            digest = hashlib.sha256(text).hexdigest()
            assert digest in trust.known_hashes(name), f"{name} of {commit[:7]}: add {digest} to trust.SHIPPED"
