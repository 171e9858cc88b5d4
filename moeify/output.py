"""The output folder: claimed for the whole run, written beside its place, swapped in whole.

A run first claims DIR (`claim`): an exclusive lock beside it, the removal of what dead runs
left there, and a note of what DIR is. The new output is written into a hidden folder beside
DIR (`staged_output`) and put in DIR's place only when complete, and only if DIR is still what
the run saw at the start; otherwise it is kept beside DIR under a visible name.

The names moeify uses beside DIR (NAME is DIR's own name):

    .NAME.moeify.lock       the lock; holds the PID of the run that has DIR
    .NAME.moeify-PID        the new output while it is written
    .NAME.moeify-PID-old    the previous output, set aside for the moment of the swap
    NAME.moeify-new-TIME    a finished output that could not take DIR's place
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import signal
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import NoReturn

from moeify.errors import MoeifyError, MoeifyFailure

Notify = Callable[[str], None]

# The outputs this process has put in place, latest last: what an interruption did not stop.
WRITTEN: list[Path] = []

# Errors of a rename onto DIR when something took DIR's place first.
TAKEN = {errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR}


class State(Enum):
    """What an output path is, in words for messages."""

    ABSENT = "nothing"
    EMPTY = "an empty folder"
    FULL = "a folder with files"
    OTHER = "a file"  # or a link, a socket: anything but a folder


@dataclass(frozen=True)
class Seen:
    """What DIR was at one moment: its state and, when it exists, its identity (st_dev, st_ino)."""

    state: State
    identity: tuple[int, int] | None = None

    @classmethod
    def of(cls, path: Path) -> Seen:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return cls(State.ABSENT)
        if not stat.S_ISDIR(st.st_mode):
            return cls(State.OTHER, (st.st_dev, st.st_ino))
        return cls(State.FULL if any(path.iterdir()) else State.EMPTY, (st.st_dev, st.st_ino))


@dataclass
class Claim:
    """The right to replace DIR, held from the run's first check until its output is in place.

    os.fspath(claim) is the folder as the user named it, so a Claim goes where a path would.
    """

    dest: Path  # absolute, its parents' symlinks resolved: where the output goes
    given: Path  # as the user wrote it, for the summary
    overwrite: bool
    seen: Seen = Seen(State.ABSENT)  # what DIR was once the lock was held
    reported: bool = True  # the user's output, named when an interruption comes once it is in place (WRITTEN)

    def __fspath__(self) -> str:
        return os.fspath(self.given)

    def protect(self, *sources: str | Path) -> None:
        """Refuse a DIR that is, holds or lies inside one of the sources (refuse_replacing)."""
        refuse_replacing(self.dest, sources)


def refuse_replacing(dest: Path, sources: Iterable[str | Path | None]) -> None:
    """Refuse an output DIR that is, holds, or lies inside one of the sources (None: none): replacing
    DIR would delete the source, and writing inside it would change a folder moeify only reads.
    A run that reads its sources long before it writes checks this first too."""
    dest = _real_output(dest)
    for source in filter(None, sources):
        places = _real_places(Path(source).expanduser())
        for place in places:
            relation = ("is" if place == dest else "contains" if dest in place.parents
                        else "is inside" if place in dest.parents else None)
            if relation:
                what = "the source" if place == places[0] else "the files of the source"
                raise MoeifyError(f"output {dest} {relation} {what} {source}; choose an output folder outside it")


def _quiet(line: str) -> None:
    pass


@contextmanager
def claim(dest: Path, overwrite: bool, protect: Iterable[str | Path] = (), notify: Notify = _quiet,
          wait: bool = False, reported: bool = True) -> Iterator[Claim]:
    """Hold DIR for a whole run: lock it, clear what dead runs left, check it and note what it is.

    A second run for the same DIR is refused, naming the first one's PID; with wait, it waits.
    Parent folders made for DIR are removed again if the run fails and nothing else is in them.
    """
    out = Claim(_real_output(dest), Path(dest), overwrite, reported=reported)
    out.protect(*protect)
    created = _make_parents(out.dest)
    lock, done = None, False
    try:
        lock = _lock(out.dest, wait, notify)
        with deferred_signals():
            _clear_leftovers(out.dest, notify)
        check_output(out.dest, overwrite)
        out.seen = Seen.of(out.dest)
        yield out
        done = True
    finally:
        with deferred_signals():
            _unlock(out.dest, lock)
            if not done:
                _remove_empty(created)


@contextmanager
def staged_output(target: Path | Claim, overwrite: bool = False,
                  protect: Iterable[str | Path] = (), needs: int = 0) -> Iterator[Path]:
    """Yield a hidden folder beside DIR; put it in DIR's place only if the block completes.

    target is DIR, or a Claim on it (which carries its own overwrite). Any failure, Ctrl-C
    included, removes the hidden folder and leaves DIR as it was. needs: the bytes about to be
    written; a filesystem without that much free space is refused before any is written.
    """
    if not isinstance(target, Claim):
        with claim(target, overwrite, protect) as out, staged_output(out, needs=needs) as staging:
            yield staging
        return
    target.protect(*protect)
    staging = target.dest.with_name(f".{target.dest.name}.moeify-{os.getpid()}")
    try:
        staging.mkdir()  # mode from the umask: a model folder is not private
        _require_space(staging, needs, target.dest)
        yield staging
        with deferred_signals():
            _put_in_place(target, staging)
            if target.reported:
                WRITTEN.append(target.dest)
    except BaseException:
        with deferred_signals():  # a second Ctrl-C must not leave half of it behind
            shutil.rmtree(staging, ignore_errors=True)
        raise


# Beyond the weights: config, card, tokenizer, code files, and the filesystem's own blocks.
SPACE_MARGIN = 64 * 2**20


def _require_space(staging: Path, needs: int, dest: Path) -> None:
    """Refuse to start writing `needs` bytes where they cannot fit (the old DIR stays until the swap)."""
    if not needs:
        return
    free = shutil.disk_usage(staging).free
    if free < needs + SPACE_MARGIN:
        from moeify.card import human

        raise MoeifyFailure(f"not enough disk space for {dest}: the output needs {human(needs + SPACE_MARGIN, 'B')}, "
                            f"its filesystem has {human(free, 'B')} free; free some space or choose another --output")


def check_output(dest: Path, overwrite: bool) -> None:
    """Refuse an output path that is a file, or a non-empty folder without overwrite (and what
    _real_output refuses: a link, the root, the current folder or one holding it)."""
    dest = _real_output(dest)
    if dest.is_file():
        raise MoeifyError(f"output {dest} is an existing file; choose a folder path")
    if dest.is_dir() and any(dest.iterdir()) and not overwrite:
        raise MoeifyError(f"output folder {dest} is not empty; pass --overwrite or choose another path")


# ---------------------------------------------------------------------------- the swap


def _put_in_place(out: Claim, staging: Path) -> None:
    """Move the finished output to DIR if DIR is still what the run saw; else keep it beside DIR."""
    now = Seen.of(out.dest)
    change = _change(out.seen, now, out.overwrite)
    if change:
        _keep_beside(out, staging, change)
    if now.state is State.FULL:
        _replace(out, staging)
    else:
        _move_in(out, staging)


def _move_in(out: Claim, staging: Path) -> None:
    """Rename the output to DIR, which is absent or an empty folder; whatever takes DIR first stays."""
    try:
        with suppress(FileNotFoundError):
            os.rmdir(out.dest)  # removes only an empty folder, whatever landed in it since the check
        os.rename(staging, out.dest)
    except OSError as e:
        if e.errno not in TAKEN:
            raise
        _keep_beside(out, staging, "something appeared there")


def _change(seen: Seen, now: Seen, overwrite: bool) -> str | None:
    """Why DIR may not be replaced any more, or None while it is what the run checked (or gone)."""
    if now.state is State.ABSENT:
        return None  # nothing there to lose
    if seen.state is State.ABSENT:
        return f"{now.state.value} appeared there"
    if now.identity != seen.identity or now.state is State.OTHER:
        return "it was replaced"
    if now.state is State.FULL and not overwrite:  # it was empty when checked
        return "files appeared in it"
    return None


def _replace(out: Claim, staging: Path) -> None:
    """Swap a full DIR for the new output; the old one stays whole until the new one is in place."""
    old = staging.with_name(staging.name + "-old")
    try:
        os.rename(out.dest, old)
    except FileNotFoundError:  # removed since the check: nothing to set aside
        return _move_in(out, staging)
    if _identity(old) != out.seen.identity:  # replaced in the instant before the rename: put it back
        os.rename(old, out.dest)
        _keep_beside(out, staging, "it was replaced")
    try:
        os.rename(staging, out.dest)
    except BaseException:
        os.rename(old, out.dest)
        raise
    shutil.rmtree(old)


def _keep_beside(out: Claim, staging: Path, why: str) -> NoReturn:
    """DIR changed under the run: touch nothing there, keep the new output under a visible name."""
    beside = _free(out.dest.with_name(f"{out.dest.name}.moeify-new-{time.strftime('%Y%m%d-%H%M%S')}"))
    os.rename(staging, beside)
    raise MoeifyFailure(f"{out.dest} changed during the run ({why}); it was left as it is and "
                        f"the new output is in {beside}")


def _free(path: Path) -> Path:
    """path, or path-2, path-3...: the first name not taken."""
    candidate, n = path, 1
    while os.path.lexists(candidate):
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate


def _identity(path: Path) -> tuple[int, int]:
    st = os.lstat(path)
    return st.st_dev, st.st_ino


# ---------------------------------------------------------------------------- paths


def _real_output(dest: Path) -> Path:
    """DIR with symlinks in its parents resolved. DIR itself may not be a link: replacing the link
    would leave the folder it points to as it was, and writing through it would replace a folder
    the user never named."""
    path = Path(dest).expanduser().absolute()
    if path.is_symlink():
        raise MoeifyError(f"output {path} is a symbolic link; pass the folder it points to "
                          f"({path.resolve()}) or remove the link")
    path = path.resolve()
    if path == path.parent:
        raise MoeifyError(f"output {path} is the root folder; choose a folder inside it")
    here = Path.cwd()
    if path == here or path in here.parents:  # `--output ""` (an unset variable) names it too
        raise MoeifyError(f"output {path} {'is' if path == here else 'holds'} the current folder, which the "
                          f"output would replace; choose a new folder for it")
    return path


def _real_places(source: Path) -> list[Path]:
    """Where a source really is: its own real path and, for a folder of links (a Hub cache
    snapshot links into blobs/), the real folders of its files."""
    if not source.exists():
        return []
    places = [source.resolve()]
    if source.is_dir():
        places += [file.resolve().parent for file in source.iterdir() if file.is_symlink()]
    return places


def _make_parents(dest: Path) -> list[Path]:
    """Create DIR's missing parents (the lock lives beside DIR); return them innermost first."""
    created = [p for p in dest.parents if not p.exists()]
    dest.parent.mkdir(parents=True, exist_ok=True)
    return created


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:  # innermost first; a folder something else landed in stays
        with suppress(OSError):
            folder.rmdir()


# ---------------------------------------------------------------------------- the lock


def _lock_path(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}.moeify.lock")


def _lock(dest: Path, wait: bool, notify: Notify) -> int:
    """flock the lock file beside DIR and write our PID in it; return its descriptor.

    The kernel drops a flock when its process dies, even by kill -9: a dead run never holds DIR.
    """
    path = _lock_path(dest)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:  # the first file the run makes beside DIR: where it learns DIR's folder takes none
            raise MoeifyError(f"cannot write in {dest.parent} ({e.strerror}), where output {dest.name} and its "
                              f"lock file go; choose an output folder you can write to") from None
        try:
            _flock(fd, dest, wait, notify)
            if _is_current(fd, path):
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # a run that just finished removed this file: lock the one now at path


def _flock(fd: int, dest: Path, wait: bool, notify: Notify) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return
    except BlockingIOError:
        holder = _holder(fd)
    if not wait:  # exit 1: nothing is wrong with the input, and the same command works once it is free
        raise MoeifyFailure(f"{dest} is being written by another moeify run (PID {holder}); "
                            "wait for it to finish or choose another output folder")
    notify(f"waiting for moeify PID {holder}, which is writing {dest}")
    fcntl.flock(fd, fcntl.LOCK_EX)


def _holder(fd: int) -> str:
    """The PID in the lock file. Its holder writes it just after locking: give it a moment."""
    for _ in range(50):
        pid = os.pread(fd, 32, 0).decode(errors="replace").strip()
        if pid:
            return pid
        time.sleep(0.01)
    return "unknown"


def _is_current(fd: int, path: Path) -> bool:
    """Whether the locked file is still the one at path (not removed by the run before us)."""
    locked = os.fstat(fd)
    try:
        return _identity(path) == (locked.st_dev, locked.st_ino)
    except FileNotFoundError:
        return False


def _unlock(dest: Path, fd: int | None) -> None:
    if fd is None:
        return
    # Removed while still locked: a run that opened it meanwhile finds it gone and opens a new one.
    _lock_path(dest).unlink(missing_ok=True)
    os.close(fd)


# ---------------------------------------------------------------------------- leftovers of dead runs


def _leftovers(dest: Path) -> list[tuple[Path, bool]]:
    """Hidden folders beside DIR from earlier runs, each with whether it is a set-aside old output."""
    pattern = re.compile(rf"\.{re.escape(dest.name)}\.moeify-\w+?(-old)?")
    found = [(p, bool(m[1])) for p in dest.parent.iterdir() if (m := pattern.fullmatch(p.name))]
    return sorted(found, key=lambda item: (not item[1], item[0].name))  # set-aside outputs first


def _clear_leftovers(dest: Path, notify: Notify) -> None:
    """Remove what dead runs left beside DIR. We hold the lock, so no live run is using any of it.

    A set-aside old output is put back when DIR is missing: it is then the only whole copy.
    """
    for path, old in _leftovers(dest):
        if old and not os.path.lexists(dest):
            os.rename(path, dest)
            notify(f"restored {dest} from {path.name}, set aside by an interrupted moeify run")
        else:
            _remove(path)
            notify(f"removed {path.name} beside {dest}, left by an interrupted moeify run")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


# ---------------------------------------------------------------------------- signals


@contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold SIGINT and SIGTERM while the block runs; deliver them once it has completed.

    Masking them with pthread_sigmask is not enough: torch and rich run threads of their own
    that let the signal in, and Python then runs its handler in the main thread all the same.
    So the handlers themselves are swapped for one that only takes note. If the block fails,
    the run is ending anyway and the noted signals are dropped.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # Python runs signal handlers in the main thread only: nothing interrupts this one
        return
    previous = {s: h for s in (signal.SIGINT, signal.SIGTERM) if (h := signal.getsignal(s)) is not None}
    noted: list[int] = []
    holding = True

    def note(signum: int, frame) -> None:
        if holding:
            noted.append(signum)
        else:  # left installed by a restore that a signal cut short: act as the old handler
            _deliver(previous[signum], signum, frame)

    try:
        for signum in previous:
            signal.signal(signum, note)
        yield
    finally:
        holding = False
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    for signum in dict.fromkeys(noted):
        _deliver(previous[signum], signum, None)


def _deliver(handler, signum: int, frame) -> None:
    if callable(handler):
        handler(signum, frame)  # Ctrl-C: KeyboardInterrupt; the CLI's SIGTERM handler does the same
    elif handler == signal.SIG_DFL:
        signal.raise_signal(signum)
