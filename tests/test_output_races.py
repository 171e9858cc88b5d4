"""Output safety against real processes: a second run, kill -9, Ctrl-C twice, --overwrite onto the source.

Each test checks the exit code, the one `error:` line, and the exact state of the disk afterwards:
source intact, old output intact, nothing hidden left beside the output.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fixtures import make_tiny, run_cli

REPO = Path(__file__).resolve().parents[1]

# `moeify` in a child process with one wait patched in (moeify itself has no test hooks): the run
# stops at GATE_AT, writes its PID to $GATE/reached, and goes on once $GATE/go exists.
#   write: while the first shard is half written (before its second tensor)
#   swap:  just after the old output was set aside, when DIR is missing
GATED_CLI = """
import dataclasses, os, sys, time
from pathlib import Path

gate = Path(os.environ["GATE"])

def wait():
    (gate / "reached").write_text(str(os.getpid()))
    while not (gate / "go").exists():
        time.sleep(0.01)

if os.environ["GATE_AT"] == "write":
    import moeify.checkpoint as c
    write_shard, produced = c._write_shard, []
    def gated(t):
        def produce():
            produced.append(t)
            if len(produced) == 2:
                wait()
            return t.produce()
        return dataclasses.replace(t, produce=produce)
    c._write_shard = lambda path, shard, on_bytes: write_shard(path, [gated(t) for t in shard], on_bytes)
else:
    rename = os.rename
    def gated_rename(src, dst, *args, **kwargs):
        rename(src, dst, *args, **kwargs)
        if str(dst).endswith("-old"):
            wait()
    os.rename = gated_rename

from moeify.cli import main
sys.argv[0] = "moeify"
main()
"""


def env() -> dict[str, str]:
    return os.environ | {"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "COLUMNS": "40"}


def hidden(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def experts(folder: Path) -> int:
    return json.loads((folder / "config.json").read_text())["num_local_experts"]


def error_line(stderr: str) -> str:
    """The run's only `error:` line (a restore or clean-up notice may come before it)."""
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    return errors[0]


def moeify(*args: object) -> subprocess.CompletedProcess:
    """The installed console script, in its own process."""
    script = shutil.which("moeify")
    assert script, "the moeify console script is not installed"
    return subprocess.run([script, *map(str, args)], capture_output=True, text=True, env=env(), timeout=300)


class Gated:
    """A `moeify` child that stops at a gate until told to go on."""

    def __init__(self, tmp_path: Path, at: str, *args: object):
        self.gate = tmp_path / f"gate-{at}"
        self.gate.mkdir()
        self.err = self.gate / "stderr"
        with open(self.err, "w") as err:
            self.child = subprocess.Popen([sys.executable, "-c", GATED_CLI, *map(str, args)], stderr=err,
                                          stdout=subprocess.DEVNULL, env=env() | {"GATE": str(self.gate), "GATE_AT": at})
        deadline = time.monotonic() + 240
        while not (self.gate / "reached").exists():
            assert self.child.poll() is None, f"ended before its gate: {self.err.read_text()}"
            assert time.monotonic() < deadline, "never reached its gate"
            time.sleep(0.02)
        self.pid = self.child.pid

    def go(self) -> tuple[int, str]:
        (self.gate / "go").touch()
        return self.finish()

    def finish(self) -> tuple[int, str]:
        try:
            code = self.child.wait(timeout=120)
        finally:
            if self.child.poll() is None:
                self.child.kill()
        return code, self.err.read_text()


@pytest.fixture
def source(tmp_path: Path) -> Path:
    return make_tiny("llama", tmp_path / "src")


@pytest.fixture
def gated(request):
    """Make Gated children; any still running at the end of the test is killed."""
    children: list[Gated] = []

    def start(*args, **kwargs) -> Gated:
        children.append(Gated(*args, **kwargs))
        return children[-1]

    yield start
    for g in children:
        if g.child.poll() is None:
            g.child.kill()
            g.child.wait()


def upcycle(source: Path, output: Path, n: int, *more: object) -> list[object]:
    return ["upcycle", source, "--experts", n, "--topk", 1, "--output", output, *more]


# ---------------------------------------------------------------------------- two runs, one output

# Every child process imports torch and transformers (3-5 s each): about a minute in all, worth it,
# since only real processes and real signals show what a second run, kill -9 or Ctrl-C leave behind.


def test_second_run_to_the_same_output_is_refused_naming_the_first(tmp_path: Path, source: Path, gated):
    output = tmp_path / "out"
    first = gated(tmp_path, "write", *upcycle(source, output, 4))
    staging = tmp_path / f".out.moeify-{first.pid}"
    half = snapshot(staging)
    second = moeify(*upcycle(source, output, 2, "--overwrite"))
    assert second.returncode == 1, second.stderr
    assert error_line(second.stderr) == (f"error: {output} is being written by another moeify run (PID {first.pid}); "
                                         "wait for it to finish or choose another output folder")
    assert not output.exists() and snapshot(staging) == half  # the first run's work is untouched
    code, err = first.go()
    assert code == 0, err
    assert experts(output) == 4 and hidden(tmp_path) == []


# ---------------------------------------------------------------------------- kill -9, then the next run


def test_run_after_kill_9_mid_write_removes_the_staging_and_says_so(tmp_path: Path, source: Path, gated):
    output = tmp_path / "out"
    first = gated(tmp_path, "write", *upcycle(source, output, 4))
    first.child.send_signal(signal.SIGKILL)
    first.finish()
    assert hidden(tmp_path) == sorted([f".out.moeify-{first.pid}", ".out.moeify.lock"])  # what kill -9 leaves
    second = moeify(*upcycle(source, output, 2))
    assert second.returncode == 0, second.stderr
    assert f"removed .out.moeify-{first.pid} beside {output}, left by an interrupted moeify run" in second.stderr
    assert experts(output) == 2 and hidden(tmp_path) == []


def test_run_after_kill_9_mid_swap_restores_the_old_output(tmp_path: Path, source: Path, gated):
    output = tmp_path / "out"
    assert run_cli(*upcycle(source, output, 2)) == 0
    old = snapshot(output)
    first = gated(tmp_path, "swap", *upcycle(source, output, 4, "--overwrite"))
    first.child.send_signal(signal.SIGKILL)
    first.finish()
    assert not output.exists()  # killed with the old output set aside and the new one not yet in
    second = moeify(*upcycle(source, output, 3))  # no --overwrite: the restored output is kept
    assert second.returncode == 2, second.stderr
    assert f"restored {output} from .out.moeify-{first.pid}-old, set aside by an interrupted moeify run" \
        in second.stderr
    assert "not empty" in error_line(second.stderr)
    assert snapshot(output) == old and hidden(tmp_path) == []


# ---------------------------------------------------------------------------- Ctrl-C twice during the swap


@pytest.mark.parametrize("signums", [(signal.SIGINT, signal.SIGINT), (signal.SIGTERM, signal.SIGINT)])
def test_two_interrupts_during_the_swap_leave_the_new_output_whole(tmp_path: Path, source: Path, gated, signums):
    output = tmp_path / "out"
    assert run_cli(*upcycle(source, output, 2)) == 0
    run = gated(tmp_path, "swap", *upcycle(source, output, 4, "--overwrite"))
    for signum in signums:
        run.child.send_signal(signum)
        time.sleep(0.05)
    code, err = run.go()
    lines = [line for line in err.splitlines() if line.strip()]
    # interrupted, as asked, and nothing else...
    assert code == 128 + signums[0] and lines == [f"error: interrupted after {output} was written whole; "
                                                   "the summary was not printed"], err
    assert experts(output) == 4 and hidden(tmp_path) == []  # ...once the swap it was in had finished


# ---------------------------------------------------------------------------- something appears at the output


def test_folder_created_at_the_output_during_the_run_is_kept(tmp_path: Path, source: Path, gated):
    output = tmp_path / "out"
    run = gated(tmp_path, "write", *upcycle(source, output, 4))
    output.mkdir()
    (output / "notes.txt").write_text("mine")
    code, err = run.go()
    assert code == 1, err
    beside, = tmp_path.glob("out.moeify-new-*")
    assert error_line(err) == (f"error: {output} changed during the run (a folder with files appeared there); "
                               f"it was left as it is and the new output is in {beside}")
    assert snapshot(output) == {"notes.txt": b"mine"}
    assert experts(beside) == 4 and hidden(tmp_path) == []


# ---------------------------------------------------------------------------- --overwrite onto the source


def assert_refused(capsys, code: int, *needles: str) -> None:
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert all(needle in lines[0] for needle in needles), (needles, lines[0])


@pytest.mark.parametrize("where", ["source", "parent"])
def test_overwrite_onto_the_source_or_its_parent_is_refused(tmp_path: Path, source: Path, capsys, where):
    output = source if where == "source" else source.parent
    before = snapshot(tmp_path)
    code = run_cli(*upcycle(source, output, 2, "--overwrite"))
    relation = "is" if where == "source" else "contains"
    assert_refused(capsys, code, f"output {output} {relation} the source {source}", "outside")
    assert snapshot(tmp_path) == before and hidden(tmp_path) == [] and hidden(source) == []


def test_overwrite_through_a_symlink_to_the_source_is_refused(tmp_path: Path, source: Path, capsys):
    link = tmp_path / "link"
    link.symlink_to(source)
    before = snapshot(source)
    code = run_cli(*upcycle(source, link, 2, "--overwrite"))
    assert_refused(capsys, code, f"output {link} is a symbolic link", str(source))
    assert snapshot(source) == before and link.readlink() == source
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "src"]


def test_overwrite_onto_a_folder_holding_a_linked_source_is_refused(tmp_path: Path, source: Path, capsys):
    """A source folder of links (as a Hub cache snapshot is): where the links point is the source too."""
    snapshot_dir = tmp_path / "hub" / "snapshots" / "0123"
    blobs = tmp_path / "hub" / "blobs"
    shutil.copytree(source, blobs)
    snapshot_dir.mkdir(parents=True)
    for file in blobs.iterdir():
        (snapshot_dir / file.name).symlink_to(file)
    before = snapshot(blobs)
    code = run_cli(*upcycle(snapshot_dir, blobs, 2, "--overwrite"))
    assert_refused(capsys, code, f"output {blobs} is the files of the source {snapshot_dir}")
    assert snapshot(blobs) == before and hidden(tmp_path / "hub") == []
