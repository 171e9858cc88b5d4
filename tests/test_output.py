"""output.py: the staged output folder that is renamed into place only when complete."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from moeify.errors import MoeifyError
from moeify.output import staged_output


def leftovers(parent: Path, name: str) -> list[Path]:
    return list(parent.glob(f".{name}.moeify-*"))


def test_staged_output_renames_into_place(tmp_path: Path):
    dest = tmp_path / "out"
    with staged_output(dest, overwrite=False) as staging:
        assert staging.parent == tmp_path and staging.name.startswith(".out.moeify-")
        assert not dest.exists()
        (staging / "f").write_text("x")
    assert (dest / "f").read_text() == "x"
    assert not leftovers(tmp_path, "out")


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError, MoeifyError])
def test_staged_output_failure_leaves_nothing(tmp_path: Path, error: type[BaseException]):
    dest = tmp_path / "out"
    with pytest.raises(error):
        with staged_output(dest, overwrite=False) as staging:
            (staging / "f").write_text("x")
            raise error("stop")
    assert not dest.exists()
    assert not leftovers(tmp_path, "out")


def test_staged_output_failure_keeps_existing_dest(tmp_path: Path):
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "old").write_text("keep me")
    with pytest.raises(KeyboardInterrupt):
        with staged_output(dest, overwrite=True) as staging:
            (staging / "new").write_text("x")
            raise KeyboardInterrupt
    assert [p.name for p in dest.iterdir()] == ["old"] and (dest / "old").read_text() == "keep me"
    assert not leftovers(tmp_path, "out")
    with staged_output(dest, overwrite=True) as staging:
        (staging / "new").write_text("x")
    assert [p.name for p in dest.iterdir()] == ["new"]


@pytest.mark.parametrize("moment", ["deleting the old output", "renaming the new one into place"])
def test_interrupt_while_replacing_an_old_output_leaves_one_of_them_whole(tmp_path: Path, monkeypatch, moment):
    """Ctrl-C while the old output is being swapped for the new one never leaves it half-deleted."""
    dest = tmp_path / "out"
    dest.mkdir()
    for name in ("a", "b", "c"):
        (dest / name).write_text(f"old {name}")
    real_rmtree, real_rename, hits = shutil.rmtree, Path.rename, []

    def rmtree(path, *args, **kwargs):
        if moment.startswith("deleting") and not hits and (Path(path) / "a").exists():
            hits.append(path)
            (Path(path) / "a").unlink()  # part of the old output is gone when Ctrl-C arrives
            raise KeyboardInterrupt
        return real_rmtree(path, *args, **kwargs)

    def rename(self, target):
        if moment.startswith("renaming") and not hits and Path(target) == dest and (self / "x").exists():
            hits.append(self)
            raise KeyboardInterrupt
        return real_rename(self, target)

    monkeypatch.setattr(shutil, "rmtree", rmtree)
    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        with staged_output(dest, overwrite=True) as staging:
            for name in ("x", "y"):
                (staging / name).write_text(f"new {name}")
    monkeypatch.undo()
    assert hits, f"never interrupted while {moment}"
    state = {p.name: p.read_text() for p in dest.iterdir()} if dest.is_dir() else None
    assert state in ({"a": "old a", "b": "old b", "c": "old c"}, {"x": "new x", "y": "new y"}), state
    assert not leftovers(tmp_path, "out")


def test_staged_output_refuses_file_and_non_empty_folder(tmp_path: Path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(MoeifyError, match="existing file"):
        with staged_output(tmp_path / "file", overwrite=True):
            pass
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(MoeifyError, match="--overwrite"):
        with staged_output(tmp_path / "full", overwrite=False):
            pass
    (tmp_path / "empty").mkdir()
    with staged_output(tmp_path / "empty", overwrite=False) as staging:  # an empty folder is fine
        (staging / "f").write_text("x")
    assert (tmp_path / "empty" / "f").is_file()
    assert not leftovers(tmp_path, "file") and not leftovers(tmp_path, "full") and not leftovers(tmp_path, "empty")


def test_staged_output_folder_is_not_private(tmp_path: Path):
    with staged_output(tmp_path / "out", overwrite=False) as staging:
        (staging / "f").write_text("x")
    assert (tmp_path / "out").stat().st_mode & 0o755 == 0o755



def test_failed_output_removes_the_parent_folders_it_made(tmp_path: Path):
    dest = tmp_path / "new" / "deeper" / "out"
    with pytest.raises(RuntimeError):
        with staged_output(dest, overwrite=False) as staging:
            (staging / "x").write_text("partial")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
