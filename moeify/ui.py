"""What people see in the terminal: progress bars and the closing summary."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn, DownloadColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TaskID, TextColumn,
    TimeRemainingColumn, TransferSpeedColumn,
)
from rich.table import Table
from rich.text import Text

from typing import TYPE_CHECKING

from moeify import engines
from moeify.card import human
from moeify.spec import Mode

if TYPE_CHECKING:
    from moeify.conversion import Result  # torch: only a conversion makes a Result

console = Console(stderr=True, highlight=False)  # progress and messages
results = Console(highlight=False)  # tables a person may pipe or redirect: `moeify models | grep qwen`


class Clock:
    """One command's run in phases: each progress bar's span under its name, the rest as loading.

    The summary's time is the whole run, so a split that calibrates for a minute does not report
    the second it took to write.
    """

    def __init__(self) -> None:
        self.start()

    def start(self, *, process: bool = False) -> None:
        """From now, or from the process's start (interpreter and imports included) when run from a shell."""
        self.started = time.time() - (_process_age() if process else 0.0)
        self.phases: dict[str, float] = {}

    def add(self, phase: str, seconds: float) -> None:
        self.phases[phase] = self.phases.get(phase, 0.0) + seconds

    def line(self) -> str:
        """'20.6 s: loading 1.9 s, calibrating 18.0 s, planning 0.1 s, writing 0.6 s'."""
        total = time.time() - self.started
        spans = {"loading": max(total - sum(self.phases.values()), 0.0), **self.phases}
        return f"{total:.1f} s: " + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in spans.items())


def _process_age() -> float:
    """Seconds since this process started: Linux's /proc to 10 ms, else 0 (from now).

    Not psutil's create_time: it adds the boot time, which Linux gives in whole seconds.
    """
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()  # after the command's name
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # proc(5) field 22: clock ticks after boot
        return max(time.clock_gettime(time.CLOCK_BOOTTIME) - started, 0.0)
    except (OSError, AttributeError, ValueError, IndexError):  # no /proc, no CLOCK_BOOTTIME
        return 0.0


clock = Clock()


def show(table: Table) -> None:
    """A result: printed on stdout, while progress and messages stay on stderr."""
    results.print(table)


def say(line: str) -> None:
    """A message or note: on stderr, with progress."""
    console.print(line, markup=False, soft_wrap=True)


def result(line: str) -> None:
    """A line of results (a measurement, a report) on stdout, beside the tables."""
    results.print(line, markup=False, soft_wrap=True)


class _Amount(ProgressColumn):
    """Bytes and speed on a byte bar, done/total on a count bar (units=False), so both share a display."""

    def __init__(self) -> None:
        super().__init__()
        self._bytes, self._speed, self._count = DownloadColumn(), TransferSpeedColumn(), MofNCompleteColumn()

    def render(self, task: Task) -> Text:
        if not task.fields.get("units", True):
            return self._count.render(task)
        return Text.assemble(self._bytes.render(task), " ", self._speed.render(task))


@contextmanager
def _progress(description: str, *counters) -> Iterator[tuple[Progress, TaskID]]:
    columns = (TextColumn("{task.description}"), BarColumn(), *counters, TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        yield progress, progress.add_task(description, total=None)


@contextmanager
def byte_progress(description: str, counted: str = "") -> Iterator[tuple]:
    """A progress bar over bytes; yields (set_total, advance) callbacks.

    With counted, a second bar over a count that runs alongside (a merge's routers, learnt while
    the shards are written) appears on its first report: yields (set_total, advance, report).
    The clock counts the time until the total is known as planning, the rest under description.
    """
    opened = planned = time.perf_counter()
    counting: TaskID | None = None

    def set_total(total: int) -> None:
        nonlocal planned
        planned = time.perf_counter()
        progress.update(task, total=total)

    def report(done: int, total: int) -> None:  # from another thread: Progress takes its own lock
        nonlocal counting
        if counting is None:
            counting = progress.add_task(counted, total=total, units=False)
        progress.update(counting, completed=done, total=total)

    with _progress(description, _Amount()) as (progress, task):
        yield (set_total, (lambda n: progress.advance(task, n))) + ((report,) if counted else ())
    clock.add("planning", planned - opened)
    clock.add(description, time.perf_counter() - planned)


@contextmanager
def count_progress(description: str) -> Iterator:
    """A progress bar over a count (tokens, layers); yields a report(done, total) callback.

    The clock counts its span under the description without its unit: 'calibrating (layers)' is calibrating.
    """
    opened = time.perf_counter()
    with _progress(description, MofNCompleteColumn()) as (progress, task):
        yield lambda done, total: progress.update(task, completed=done, total=total)
    clock.add(description.split(" (")[0], time.perf_counter() - opened)


def conclude(result: Result) -> None:
    """The end of a conversion: a note when --dtype rounded the weights, then the summary."""
    if result.narrowed:
        source, output = result.narrowed.split(" -> ")
        say(f"note: --dtype {output} narrows the source's {source} weights (they round to {output}'s precision and "
            f"range): the output is close to the source, not equal; --dtype auto keeps them exactly")
    show(summary(result))


def summary(result: Result) -> Table:
    spec = result.spec
    table = Table(title=f"{result.output}", show_header=False, title_justify="left")
    # The target's reason may say the format holds the conversion exactly; lossy options make that untrue.
    reason = result.reason if not result.changes or "exactly" not in result.reason else result.reason.split(":")[0]
    table.add_row("format", f"{result.target} — {reason}")
    if result.changes:
        table.add_row("not exact", "; ".join(result.changes))
    table.add_row("engines", engines.line(result.engines))
    table.add_row("layers", f"{len(result.moe_layers)} MoE of {result.num_layers}")
    table.add_row("experts", f"{spec.routed_experts} routed, top-{spec.active_experts}, {spec.shared_experts} shared")
    if spec.mode is Mode.SPLIT and spec.active_experts == spec.routed_experts:
        table.add_row("active", "every piece: exact, no compute saved (--topk K keeps K per token)")
    table.add_row("parameters", f"{human(result.total_params)} total, {human(result.active_params)} active per token")
    table.add_row("size", f"{human(result.total_bytes, 'B')} in {len(result.files)} shard(s)")
    table.add_row("time", clock.line())
    return table
