"""output.py: the claimed, staged output folder that is swapped into place only when complete."""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest

from moeify.errors import MoeifyError, MoeifyFailure
from moeify.output import claim, deferred_signals, staged_output


def hidden(parent: Path) -> list[str]:
    """Everything moeify could leave hidden beside an output: staging, set-aside outputs, the lock."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): p.read_text() for p in sorted(folder.rglob("*")) if p.is_file()}


def old_output(dest: Path) -> Path:
    dest.mkdir(parents=True)
    for name in ("a", "b", "c"):
        (dest / name).write_text(f"old {name}")
    return dest


OLD = {"a": "old a", "b": "old b", "c": "old c"}


def test_staged_output_renames_into_place(tmp_path: Path):
    dest = tmp_path / "out"
    with staged_output(dest, overwrite=False) as staging:
        assert staging.parent == tmp_path and staging.name == f".out.moeify-{os.getpid()}"
        assert not dest.exists()
        (staging / "f").write_text("x")
    assert tree(dest) == {"f": "x"}
    assert hidden(tmp_path) == []


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError, MoeifyError])
def test_staged_output_failure_leaves_nothing(tmp_path: Path, error: type[BaseException]):
    dest = tmp_path / "out"
    with pytest.raises(error):
        with staged_output(dest, overwrite=False) as staging:
            (staging / "f").write_text("x")
            raise error("stop")
    assert list(tmp_path.iterdir()) == []


def test_staged_output_failure_keeps_existing_dest(tmp_path: Path):
    dest = old_output(tmp_path / "out")
    with pytest.raises(KeyboardInterrupt):
        with staged_output(dest, overwrite=True) as staging:
            (staging / "new").write_text("x")
            raise KeyboardInterrupt
    assert tree(dest) == OLD and hidden(tmp_path) == []
    with staged_output(dest, overwrite=True) as staging:
        (staging / "new").write_text("x")
    assert tree(dest) == {"new": "x"} and hidden(tmp_path) == []


@pytest.fixture
def sigterm_raises():
    """SIGTERM handled as the CLI handles it (KeyboardInterrupt) instead of ending pytest."""
    def terminate(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, terminate)
    yield
    signal.signal(signal.SIGTERM, previous)


def signals_during(monkeypatch, module, name: str, when, plan: list[tuple[int, ...]]) -> list:
    """Patch module.name to send itself real signals just after doing its job: the signals plan[i]
    at the i-th call that `when(args)` accepts. Returns the signals sent."""
    real, sent, calls = getattr(module, name), [], []

    def patched(*args, **kwargs):
        done = real(*args, **kwargs)
        if when(*args) and len(calls) < len(plan):
            calls.append(args)
            for signum in plan[len(calls) - 1]:
                os.kill(os.getpid(), signum)
                sent.append(signum)
                time.sleep(0.01)  # a gap in which Python runs the handler
        return done

    monkeypatch.setattr(module, name, patched)
    return sent


@pytest.mark.parametrize("signums", [(signal.SIGINT, signal.SIGINT), (signal.SIGTERM, signal.SIGINT)])
@pytest.mark.parametrize("moment", ["old set aside", "old being deleted"])
def test_signals_during_the_swap_wait_for_it(tmp_path: Path, monkeypatch, sigterm_raises, moment, signums):
    """Two signals at the worst moments of the swap: the swap completes, then the run stops."""
    dest = old_output(tmp_path / "out")
    if moment == "old set aside":  # DIR is missing now: only the set-aside copy is whole
        sent = signals_during(monkeypatch, os, "rename", lambda src, dst: str(dst).endswith("-old"), [signums])
    else:  # the new output is in place; one signal per old file deleted
        sent = signals_during(monkeypatch, os, "unlink", lambda name, *rest: name in OLD, [(s,) for s in signums])
    with pytest.raises(KeyboardInterrupt):
        with staged_output(dest, overwrite=True) as staging:
            for name in ("x", "y"):
                (staging / name).write_text(f"new {name}")
    monkeypatch.undo()
    assert sent == list(signums), f"not all signals sent with {moment}"
    assert tree(dest) == {"x": "new x", "y": "new y"} and hidden(tmp_path) == []


def test_signals_during_cleanup_do_not_leave_half_a_staging_folder(tmp_path: Path, monkeypatch):
    """Ctrl-C, then Ctrl-C again while the unfinished output is being removed: it is removed whole."""
    dest = tmp_path / "out"
    sent = signals_during(monkeypatch, os, "unlink", lambda *args: True, [(signal.SIGINT,)])
    with pytest.raises(KeyboardInterrupt):
        with staged_output(dest, overwrite=False) as staging:
            for name in "abcdef":
                (staging / name).write_text(name)
            raise KeyboardInterrupt  # the first Ctrl-C
    monkeypatch.undo()
    assert sent and list(tmp_path.iterdir()) == []


def test_deferred_signals_are_delivered_after_the_block_and_dropped_on_failure():
    steps = []
    with pytest.raises(KeyboardInterrupt):
        with deferred_signals():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            steps.append("block finished")
    assert steps == ["block finished"]
    with pytest.raises(RuntimeError):  # the run is ending with its own error: no Ctrl-C on top of it
        with deferred_signals():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            raise RuntimeError("failed")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# ---------------------------------------------------------------------------- refusals


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
    assert hidden(tmp_path) == []


def test_output_that_is_a_symlink_is_refused_and_left_alone(tmp_path: Path):
    real = old_output(tmp_path / "real")
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(MoeifyError, match=f"symbolic link; pass the folder it points to \\({real}\\)"):
        with staged_output(link, overwrite=True):
            pass
    assert link.readlink() == real and tree(real) == OLD
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]


@pytest.mark.parametrize("output", ["source", "parent", "grandparent", "inside"])
def test_output_holding_the_source_is_refused(tmp_path: Path, output: str):
    source = old_output(tmp_path / "disk" / "models" / "src")
    dest = {"source": source, "parent": source.parent, "grandparent": source.parent.parent,
            "inside": source / "moe"}[output]
    with pytest.raises(MoeifyError, match="the source"):
        with staged_output(dest, overwrite=True, protect=[source]):
            pass
    assert tree(source) == OLD and hidden(dest.parent) == []


@pytest.mark.parametrize("given", ["", ".", "..", "here"])
def test_output_that_is_or_holds_the_current_folder_is_refused(tmp_path: Path, monkeypatch, given: str):
    """`--output ""` (an unset shell variable) is the current folder: replacing it would delete the user's files."""
    here = old_output(tmp_path / "work" / "here")
    monkeypatch.chdir(here)
    with pytest.raises(MoeifyError, match="the current folder"):
        with staged_output(Path(given) if given != "here" else here, overwrite=True):
            pass
    assert tree(here) == OLD and hidden(tmp_path / "work") == [] and hidden(tmp_path) == []


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc, a folder no file can be made in")
def test_an_output_folder_nothing_can_be_written_in_is_one_line():
    with pytest.raises(MoeifyError, match="cannot write in /proc .*choose an output folder you can write to"):
        with staged_output(Path("/proc/moeify-out")):
            pass


def test_only_the_users_outputs_are_named_after_an_interruption(tmp_path: Path):
    """The CLI names WRITTEN's last output when a signal comes after it; moeify's cache is not one."""
    from moeify.output import WRITTEN

    WRITTEN.clear()
    with claim(tmp_path / "cache", overwrite=True, reported=False) as out, staged_output(out) as staging:
        (staging / "f").write_text("x")
    assert WRITTEN == []
    with staged_output(tmp_path / "out") as staging:
        (staging / "f").write_text("x")
    assert WRITTEN == [tmp_path / "out"]


def test_output_holding_the_files_a_source_links_to_is_refused(tmp_path: Path):
    """A Hub cache snapshot is a folder of links into blobs/: the blobs are the source too."""
    blobs = tmp_path / "hub" / "models--acme--tiny" / "blobs"
    snapshot = tmp_path / "hub" / "models--acme--tiny" / "snapshots" / "0123"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (blobs / "f00d").write_text("weights")
    (snapshot / "model.safetensors").symlink_to(blobs / "f00d")
    with pytest.raises(MoeifyError, match="the files of the source"):
        with staged_output(blobs, overwrite=True, protect=[snapshot]):
            pass
    assert (snapshot / "model.safetensors").read_text() == "weights"
    with staged_output(tmp_path / "hub" / "other", overwrite=True, protect=[snapshot]) as staging:
        (staging / "f").write_text("fine")  # a folder beside the source is fine


def test_failed_output_removes_the_parent_folders_it_made(tmp_path: Path):
    dest = tmp_path / "new" / "deeper" / "out"
    with pytest.raises(RuntimeError):
        with staged_output(dest, overwrite=False) as staging:
            (staging / "x").write_text("partial")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_staged_output_folder_is_not_private(tmp_path: Path):
    with staged_output(tmp_path / "out", overwrite=False) as staging:
        (staging / "f").write_text("x")
    assert (tmp_path / "out").stat().st_mode & 0o755 == 0o755


# ---------------------------------------------------------------------------- the lock


def test_a_second_claim_is_refused_naming_the_holder(tmp_path: Path):
    dest = tmp_path / "out"
    with claim(dest, overwrite=False) as out:
        assert (tmp_path / ".out.moeify.lock").read_text() == f"{os.getpid()}\n"
        with pytest.raises(MoeifyFailure, match=f"another moeify run \\(PID {os.getpid()}\\)"):
            with staged_output(dest, overwrite=True):
                pass
        with staged_output(out) as staging:
            (staging / "f").write_text("first")
    assert tree(dest) == {"f": "first"} and hidden(tmp_path) == []


def test_a_waiting_claim_takes_over_when_the_holder_is_done(tmp_path: Path):
    dest, lines, order = tmp_path / "out", [], []

    def second():
        with claim(dest, overwrite=True, notify=lines.append, wait=True):
            order.append("second has it")

    with claim(dest, overwrite=False):
        waiter = threading.Thread(target=second)
        waiter.start()
        deadline = time.monotonic() + 10
        while not lines and time.monotonic() < deadline:
            time.sleep(0.01)
        order.append("first lets go")
    waiter.join(10)
    assert lines == [f"waiting for moeify PID {os.getpid()}, which is writing {dest}"]
    assert order == ["first lets go", "second has it"] and hidden(tmp_path) == []


def test_a_lock_file_left_by_a_dead_run_does_not_hold(tmp_path: Path):
    (tmp_path / ".out.moeify.lock").write_text("999999999\n")  # kill -9 leaves the file, not the flock
    with staged_output(tmp_path / "out") as staging:
        (staging / "f").write_text("x")
    assert tree(tmp_path / "out") == {"f": "x"} and hidden(tmp_path) == []


# ---------------------------------------------------------------------------- DIR changed during the run


def appear(kind: str, dest: Path) -> dict[str, str] | str:
    """Make something of `kind` appear at dest; return what must still be there afterwards."""
    if kind == "folder":
        dest.mkdir()
        (dest / "mine.txt").write_text("user")
        return {"mine.txt": "user"}
    if kind == "empty folder":
        dest.mkdir()
        return {}
    if kind == "file in the empty folder":
        (dest / "mine.txt").write_text("user")
        return {"mine.txt": "user"}
    if kind == "other folder":  # the checked folder is moved away and another takes its name
        dest.rename(dest.with_name("moved"))
        return appear("folder", dest)
    dest.write_text("user")  # a file
    return "user"


@pytest.mark.parametrize("kind, start, overwrite", [
    ("folder", None, False), ("empty folder", None, False), ("file", None, False), ("folder", None, True),
    ("file in the empty folder", "empty", False), ("other folder", "full", True),
])
def test_what_appears_at_the_output_during_the_run_is_kept(tmp_path: Path, kind, start, overwrite):
    dest = tmp_path / "out"
    if start == "empty":
        dest.mkdir()
    elif start == "full":
        old_output(dest)
    with pytest.raises(MoeifyFailure, match=f"{dest} changed during the run .* the new output is in") as failure:
        with staged_output(dest, overwrite=overwrite) as staging:
            (staging / "model").write_text("new")
            expected = appear(kind, dest)
    assert (tree(dest) if dest.is_dir() else dest.read_text()) == expected
    beside, = tmp_path.glob("out.moeify-new-*")
    assert str(beside) in str(failure.value) and tree(beside) == {"model": "new"}
    assert hidden(tmp_path) == []
    if kind == "other folder":
        assert tree(tmp_path / "moved") == OLD


def test_output_removed_during_the_run_is_simply_written(tmp_path: Path):
    dest = old_output(tmp_path / "out")
    with staged_output(dest, overwrite=True) as staging:
        (staging / "model").write_text("new")
        shutil.rmtree(dest)
    assert tree(dest) == {"model": "new"} and hidden(tmp_path) == []


# ---------------------------------------------------------------------------- leftovers of dead runs


def test_staging_left_by_a_dead_run_is_removed_and_said(tmp_path: Path):
    dest = tmp_path / "out"
    stale = tmp_path / ".out.moeify-4242"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    (tmp_path / ".other.moeify-4242").mkdir()  # another output's: not ours to touch
    lines = []
    with claim(dest, overwrite=False, notify=lines.append) as out, staged_output(out) as staging:
        (staging / "f").write_text("x")
    assert lines == [f"removed .out.moeify-4242 beside {dest}, left by an interrupted moeify run"]
    assert tree(dest) == {"f": "x"} and hidden(tmp_path) == [".other.moeify-4242"]


def test_old_output_set_aside_by_a_dead_run_is_restored(tmp_path: Path):
    """kill -9 between moving the old output aside and moving the new one in: DIR is missing."""
    dest = tmp_path / "out"
    old_output(tmp_path / ".out.moeify-4242-old")
    (tmp_path / ".out.moeify-4242").mkdir()  # the new output, whole or not: nobody can tell
    lines = []
    with pytest.raises(MoeifyError, match="not empty"):
        with claim(dest, overwrite=False, notify=lines.append):
            pass
    assert lines == [f"restored {dest} from .out.moeify-4242-old, set aside by an interrupted moeify run",
                     f"removed .out.moeify-4242 beside {dest}, left by an interrupted moeify run"]
    assert tree(dest) == OLD and hidden(tmp_path) == []


def test_old_output_half_deleted_by_a_dead_run_is_removed(tmp_path: Path):
    """kill -9 while deleting the old output: the new one was in place already."""
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "model").write_text("new")
    (tmp_path / ".out.moeify-4242-old").mkdir()
    lines = []
    with claim(dest, overwrite=True, notify=lines.append):
        pass
    assert lines == [f"removed .out.moeify-4242-old beside {dest}, left by an interrupted moeify run"]
    assert tree(dest) == {"model": "new"} and hidden(tmp_path) == []


# ---------------------------------------------------------------------------- the .gguf dequantization cache


def test_concurrent_dequantizations_of_one_gguf_take_turns(tmp_path: Path, monkeypatch):
    """A second run dequantizing the same .gguf waits for the first one's write, then keeps its result."""
    import transformers

    from moeify.source import from_gguf

    monkeypatch.setenv("MOEIFY_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF")
    writing, go, saved = threading.Event(), threading.Event(), []

    class Loaded:  # stands for the dequantized model and tokenizer; the first save is slow
        @classmethod
        def from_pretrained(cls, *args, output_loading_info=False, **kwargs):
            return (cls(), {"missing_keys": set()}) if output_loading_info else cls()

        def save_pretrained(self, folder):
            saved.append(threading.current_thread().name)
            if len(saved) == 1:
                writing.set()
                go.wait(10)
            (Path(folder) / "config.json").write_text(threading.current_thread().name)

    monkeypatch.setattr(transformers, "AutoModelForCausalLM", Loaded)
    monkeypatch.setattr(transformers, "AutoTokenizer", Loaded)
    first = threading.Thread(target=from_gguf, args=(gguf, lambda line: None), name="first")
    first.start()
    assert writing.wait(10)
    lines = []
    dest = from_gguf(gguf, lambda line: (lines.append(line), line.startswith("waiting") and go.set()))
    first.join(10)
    assert lines[-1] == f"waiting for moeify PID {os.getpid()}, which is writing {dest}"
    assert saved == ["first", "first"] and (dest / "config.json").read_text() == "first"
    assert hidden(dest.parent) == []
