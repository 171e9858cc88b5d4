"""`moeify push` with huggingface_hub's client replaced at moeify.hub's boundary: no network."""

from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

from moeify import hub
from moeify.card import front_matter
from moeify.conversion import convert
from moeify.spec import Spec
from tests.fixtures import make_tiny, run_cli


@pytest.fixture(scope="module")
def output(tmp_path_factory) -> Path:
    """A finished moeify output in several shards (with an index), its source carrying a license."""
    root = tmp_path_factory.mktemp("push")
    source = make_tiny("llama", root / "src")
    (source / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny\n")
    convert(source, root / "out", Spec(experts=4, topk=2, max_shard_size="200KB"), source=str(source))
    assert (root / "out" / "model.safetensors.index.json").is_file()
    return root / "out"


@pytest.fixture
def folder(output, tmp_path) -> Path:
    """A fresh copy of the output, free to damage."""
    import shutil

    return Path(shutil.copytree(output, tmp_path / "model"))


class Forbidden(HfHubHTTPError):
    """The Hub's HTTP error, without building an HTTP response for it."""

    def __init__(self, message: str):
        Exception.__init__(self, message)


class ReadTimeout(Exception):
    """What an HTTP library raises on a timeout: neither OSError nor huggingface_hub's own."""


class FakeHub:
    """Records every HfApi call moeify makes; `fail` makes upload_folder raise like the Hub does,
    `fail_at` makes any call raise the error it maps the call's name to."""

    def __init__(self, monkeypatch, token: str | None = "hf_test"):
        self.calls: list[tuple[str, tuple, dict]] = []
        self.card_at_upload: str | None = None  # the README.md bytes upload_file sent
        self.fail = False
        self.fail_at: dict[str, Exception] = {}
        hub_ = self

        def record(name):
            def method(api, *args, **kwargs):
                hub_.calls.append((name, args, kwargs))
                if hub_.fail and name in ("upload_folder", "upload_large_folder"):
                    raise Forbidden("403 Forbidden: you do not have write access\nmore details")
                if name in hub_.fail_at:
                    raise hub_.fail_at[name]
                if name == "upload_file":
                    hub_.card_at_upload = kwargs["path_or_fileobj"].decode()
                if name == "create_repo":
                    return f"https://huggingface.co/{args[0]}"
            return method

        for name in ("create_repo", "create_branch", "upload_folder", "upload_file"):
            monkeypatch.setattr(huggingface_hub.HfApi, name, record(name))
        monkeypatch.setattr(hub, "get_token", lambda: token)
        self.record = record

    @property
    def names(self) -> list[str]:
        return [name for name, _, _ in self.calls]


def test_push_creates_repo_then_uploads_with_refreshed_card(folder, monkeypatch, capsys):
    fake = FakeHub(monkeypatch)
    assert run_cli("push", folder, "--repo-id", "me/tiny-moe", "--private", "--message", "first") == 0
    assert fake.names == ["create_repo", "upload_folder", "upload_file"]
    _, args, kwargs = fake.calls[0]
    assert args == ("me/tiny-moe",) and kwargs["private"] is True and kwargs["exist_ok"] is True
    assert kwargs["repo_type"] == "model"
    _, _, kwargs = fake.calls[1]
    assert kwargs["repo_id"] == "me/tiny-moe" and Path(kwargs["folder_path"]) == folder
    assert kwargs["commit_message"] == "first" and kwargs["revision"] is None
    assert "README.md" in kwargs["ignore_patterns"]  # the folder's old card is not what the repo gets
    _, _, kwargs = fake.calls[2]
    assert kwargs["path_in_repo"] == "README.md" and kwargs["repo_id"] == "me/tiny-moe"
    # The card was rendered again for the repo and uploaded last: usage names the repo id.
    assert 'from_pretrained("me/tiny-moe")' in fake.card_at_upload
    assert "# tiny-moe" in fake.card_at_upload
    assert (folder / "README.md").read_text() == fake.card_at_upload  # written locally after success
    assert front_matter(folder / "README.md")["license"] == "apache-2.0"  # kept from the first card
    assert not list(folder.glob(".README*"))
    assert "https://huggingface.co/me/tiny-moe" in capsys.readouterr().err


def test_revision_creates_the_branch(folder, monkeypatch):
    fake = FakeHub(monkeypatch)
    assert run_cli("push", folder, "--repo-id", "me/tiny-moe", "--revision", "v1") == 0
    assert fake.names == ["create_repo", "create_branch", "upload_folder", "upload_file"]
    assert fake.calls[1][2]["branch"] == "v1" and fake.calls[1][2]["exist_ok"] is True
    assert fake.calls[2][2]["revision"] == "v1" and fake.calls[3][2]["revision"] == "v1"


def test_large_output_uses_upload_large_folder_when_available(folder, monkeypatch):
    fake = FakeHub(monkeypatch)
    monkeypatch.setattr(hub, "LARGE_UPLOAD", 1000)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_large_folder", fake.record("upload_large_folder"), raising=False)
    assert run_cli("push", folder, "--repo-id", "me/tiny-moe") == 0
    assert fake.names == ["create_repo", "upload_large_folder", "upload_file"]
    assert fake.calls[1][2]["repo_type"] == "model" and Path(fake.calls[1][2]["folder_path"]) == folder
    assert "README.md" in fake.calls[1][2]["ignore_patterns"]


def test_large_output_without_upload_large_folder_uses_upload_folder(folder, monkeypatch):
    """huggingface_hub 2.x dropped upload_large_folder: upload_folder commits large folders in parts."""
    fake = FakeHub(monkeypatch)
    monkeypatch.setattr(hub, "LARGE_UPLOAD", 1000)
    monkeypatch.delattr(huggingface_hub.HfApi, "upload_large_folder", raising=False)
    assert run_cli("push", folder, "--repo-id", "me/tiny-moe") == 0
    assert fake.names == ["create_repo", "upload_folder", "upload_file"]


def test_dry_run_lists_files_and_makes_no_call(folder, monkeypatch, capsys):
    fake = FakeHub(monkeypatch, token=None)  # no token needed either
    card = (folder / "README.md").read_text()
    assert run_cli("push", folder, "--repo-id", "me/tiny-moe", "--dry-run") == 0
    assert fake.calls == []
    out = capsys.readouterr().out  # the dry run's table is a result
    for name in ("config.json", "README.md", "moeify.json", "model.safetensors.index.json", "model-00001-of-"):
        assert name in out
    assert "total" in out and "dry run" in out
    assert (folder / "README.md").read_text() == card  # nothing changed on disk


def damage_missing(name: str):
    return lambda folder: (folder / name).unlink()


def drop_shard(folder: Path) -> None:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    (folder / sorted(set(index["weight_map"].values()))[-1]).unlink()


def drop_all_weights(folder: Path) -> None:
    (folder / "model.safetensors.index.json").unlink()
    for shard in folder.glob("*.safetensors"):
        shard.unlink()


def truncate_shard(folder: Path) -> None:
    shard = sorted(folder.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:1000])


def need_remote_code(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_moeify.MoeifyForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("damage,message", [
    (damage_missing("config.json"), "not a complete moeify output (no config.json)"),
    (damage_missing("README.md"), "not a complete moeify output (no README.md)"),
    (damage_missing("moeify.json"), "not a complete moeify output (no moeify.json)"),
    (drop_shard, "is named in model.safetensors.index.json but missing"),
    (drop_all_weights, "holds no safetensors weights"),
    (truncate_shard, "is truncated"),
    (need_remote_code, "lacks modeling_moeify.py"),
], ids=["config", "card", "record", "shard", "weights", "truncated", "code"])
def test_incomplete_output_is_refused_before_any_call(folder, monkeypatch, capsys, damage, message):
    fake = FakeHub(monkeypatch)
    damage(folder)
    for dry_run in ((), ("--dry-run",)):
        assert run_cli("push", folder, "--repo-id", "me/tiny-moe", *dry_run) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and err.count("\n") <= 1  # one line (rich may wrap a long path)
    assert fake.calls == []


def test_not_a_folder_is_refused(tmp_path, monkeypatch, capsys):
    fake = FakeHub(monkeypatch)
    assert run_cli("push", tmp_path / "nowhere", "--repo-id", "me/x") == 2
    assert "is not a folder" in capsys.readouterr().err and fake.calls == []


def test_no_token_is_one_clear_line(folder, monkeypatch, capsys):
    fake = FakeHub(monkeypatch, token=None)
    card = (folder / "README.md").read_text()
    assert run_cli("push", folder, "--repo-id", "me/tiny-moe") == 2
    assert "no Hugging Face token: set HF_TOKEN or run `hf auth login`" in capsys.readouterr().err
    assert fake.calls == [] and (folder / "README.md").read_text() == card


def test_bad_repo_id(folder, monkeypatch, capsys):
    fake = FakeHub(monkeypatch)
    assert run_cli("push", folder, "--repo-id", "just-a-name") == 2
    assert "is not of the form USER/NAME" in capsys.readouterr().err and fake.calls == []


def test_hub_failure_is_one_clear_line(folder, monkeypatch, capsys):
    fake = FakeHub(monkeypatch)
    fake.fail = True
    assert run_cli("push", folder, "--repo-id", "me/tiny-moe") == 1  # the Hub failed, not the input
    err = capsys.readouterr().err
    assert "uploading to me/tiny-moe failed (Forbidden: 403 Forbidden" in err and "more details" not in err


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("repo_id", ["just-a-name", "me/a..b", "me/a--b", "a/b/c", "me/-x", "me/x.git", "me/",
                                     "me/" + "x" * 100, "me/na me", "me/{i}"])
def test_invalid_repo_id_is_refused_before_anything(tmp_path, folder, monkeypatch, capsys, repo_id):
    fake = FakeHub(monkeypatch)
    before = snapshot(folder)
    for target in (folder, tmp_path / "nowhere"):  # the id is checked before the folder is even looked at
        for dry_run in ((), ("--dry-run",)):
            assert run_cli("push", target, "--repo-id", repo_id, *dry_run) == 2
            err = capsys.readouterr().err.strip()
            assert err.startswith(f"error: --repo-id {repo_id!r} is not") and err.count("\n") == 0, err
    assert fake.calls == [] and snapshot(folder) == before


@pytest.mark.parametrize("call", ["create_repo", "upload_folder", "upload_file"])
@pytest.mark.parametrize("error", [Forbidden("500 Internal Server Error"), ConnectionError("Connection refused"),
                                   OfflineModeIsEnabled("offline"), ReadTimeout("timed out")],
                         ids=["http", "connection", "offline", "timeout"])
def test_network_failure_exits_1_and_leaves_the_folder_as_it_was(folder, monkeypatch, capsys, call, error):
    fake = FakeHub(monkeypatch)
    fake.fail_at[call] = error
    before = snapshot(folder)
    assert run_cli("push", folder, "--repo-id", "me/tiny-moe") == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: uploading to me/tiny-moe failed ({type(error).__name__}: ") and "\n" not in err
    assert fake.names[-1] == call
    assert snapshot(folder) == before  # README.md byte for byte, and no staged card left behind


def corrupt_json(name: str, text: str):
    return lambda folder: (folder / name).write_text(text)


@pytest.mark.parametrize("damage,message", [
    (corrupt_json("moeify.json", "{not json"), "cannot read"),
    (corrupt_json("moeify.json", "[1, 2]"), "moeify.json is not a JSON object"),
    (corrupt_json("config.json", "{\"model_type\": "), "cannot read"),
], ids=["moeify-json", "moeify-list", "config"])
def test_corrupt_json_is_one_line_before_any_call(folder, monkeypatch, capsys, damage, message):
    fake = FakeHub(monkeypatch)
    damage(folder)
    before = snapshot(folder)
    for dry_run in ((), ("--dry-run",)):
        assert run_cli("push", folder, "--repo-id", "me/tiny-moe", *dry_run) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and err.count("\n") == 0, err
    assert fake.calls == [] and snapshot(folder) == before


@pytest.mark.parametrize("fields", [{"total_params": "lots"}, {"experts": "many"}, {"source": {"a": 1}, "mode": 3}],
                         ids=["params", "spec", "types"])
def test_moeify_json_with_wrong_fields_is_one_line(folder, monkeypatch, capsys, fields):
    fake = FakeHub(monkeypatch)
    record = json.loads((folder / "moeify.json").read_text())
    (folder / "moeify.json").write_text(json.dumps(record | fields))
    before = snapshot(folder)
    assert run_cli("push", folder, "--repo-id", "me/tiny-moe") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and err.count("\n") == 0, err
    assert fake.calls == [] and snapshot(folder) == before
