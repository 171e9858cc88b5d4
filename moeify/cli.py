"""The `moeify` command: wiring only. Each command lives in moeify/commands/."""

from __future__ import annotations

import gc
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Annotated

import typer

from moeify.commands.apply import apply
from moeify.commands.expand import expand
from moeify.commands.help import Command, Group
from moeify.commands.inspect import inspect
from moeify.commands.merge import merge
from moeify.commands.models import models
from moeify.commands.peer import peer
from moeify.commands.push import push
from moeify.commands.split import split
from moeify.commands.train import train
from moeify.commands.upcycle import upcycle
from moeify.commands.verify import verify
from moeify.errors import Interrupted, MoeifyError
from moeify.recipe import SHIPPED

app = typer.Typer(
    name="moeify",
    help="Turn a dense Hugging Face causal LM into a Mixture-of-Experts model.\n\n"
    "Example: moeify upcycle smollm2-135m --experts 8 --topk 2 --output smollm2-8x135m",
    cls=Group,
    no_args_is_help=True,
    rich_markup_mode=None,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"moeify {version('moeify')}")
        raise typer.Exit()


@app.callback()
def _options(version: Annotated[bool, typer.Option("--version", metavar="", is_eager=True, callback=_version,
                                                   help="Print the version and exit.")] = False) -> None:
    """Turn a dense Hugging Face causal LM into a Mixture-of-Experts model.

    Example: moeify upcycle smollm2-135m --experts 8 --topk 2 --output smollm2-8x135m
    """


# Every command module imports torch and transformers only when the command runs: `moeify --help`,
# `moeify CMD --help`, `moeify models` and `moeify inspect` start in a fraction of a second.
app.command(cls=Command, epilog="Aliases: see `moeify models`.")(upcycle)
app.command(cls=Command, epilog="Aliases: see `moeify models`.")(split)
app.command(cls=Command, epilog="Aliases: see `moeify models`.")(merge)
app.command(cls=Command, epilog="Aliases: see `moeify models`.")(peer)
app.command(cls=Command)(expand)
app.command(cls=Command)(models)
app.command(cls=Command, epilog="Aliases: see `moeify models`.")(inspect)
app.command(cls=Command, epilog=f"Shipped recipes ({SHIPPED}) work by name or as recipes/NAME.yaml "
                                 "from any directory.")(apply)
app.command(cls=Command)(push)
app.command(cls=Command)(verify)
app.command(cls=Command, epilog="Multi-process: accelerate launch [--config_file F] -m moeify train ...")(train)


INTERRUPTED = Interrupted.exit_code


_terminated = False


def _terminate(signum, frame):  # SIGTERM cleans up like Ctrl-C: staged output is removed
    global _terminated
    _terminated = True
    raise KeyboardInterrupt


def _stopped() -> str:
    """What an interruption left: every command writes through a staged output, removed when it is
    interrupted, so an output is either whole (put in place before the signal came) or as it was."""
    from moeify.output import WRITTEN

    if WRITTEN:
        return f"interrupted after {WRITTEN[-1]} was written whole; the summary was not printed"
    return "interrupted: nothing was written and any earlier output is as it was; run the command again"


def _interrupted_code() -> int:
    """The shell's code for a command ended by the signal: 128 + SIGINT (130) or + SIGTERM (143)."""
    return 128 + (signal.SIGTERM if _terminated else signal.SIGINT)


def _usage_message(error: typer.TyperException) -> str:
    # typer validates choices with pydantic, whose wording leaks into click's message
    return error.format_message().replace("Value error, ", "")


def _command_path(error: typer.TyperException) -> str:
    """`moeify upcycle` for an error in upcycle's options: its --help lists them."""
    context = getattr(error, "ctx", None)
    return context.command_path if context is not None and context.command_path else "moeify"


def main(argv: list[str] | None = None) -> None:
    from moeify.ui import clock

    signal.signal(signal.SIGTERM, _terminate)
    clock.start(process=argv is None)  # the summary's time: the whole process from a shell, from here in-process
    with _rare_collections() if argv is None else nullcontext():
        _run(argv)


@contextmanager
def _rare_collections() -> Iterator[None]:
    """Python's cycle collector, tuned for a process that imports torch and transformers once and exits.

    Those imports make ~600k objects, and at Python's default thresholds the full collections among
    them cost ~1.5 s of a ~5 s start-up, and the final collection at exit ~1.6 s more (SmolLM2
    merge, measured). Young objects are collected every 50k allocations instead of 700, and what is
    left at the end is frozen so that exit does not scan it (exit handlers and finalisers still
    run). In-process callers (tests, notebooks) keep Python's own settings.
    """
    gc.set_threshold(50_000, 20, 20)
    try:
        yield
    finally:
        gc.freeze()


def _run(argv: list[str] | None) -> None:
    from moeify.output import WRITTEN

    global _terminated
    WRITTEN.clear()  # an in-process caller's earlier runs
    _terminated = False
    try:
        # standalone_mode=False: usage errors reach us and print as one line like every other error
        code = app(args=argv if argv is not None else sys.argv[1:] or ["--help"], prog_name="moeify",
                   standalone_mode=False)
        if code == INTERRUPTED:  # typer ends a KeyboardInterrupt (Ctrl-C, SIGTERM) so, silently
            _fail(_stopped(), _interrupted_code())
        sys.exit(code or 0)  # as standalone Click did: typer.Exit(n) from a command, else 0
    except typer.TyperException as e:  # a usage error (exit 2) or an unreadable file argument
        _fail(f"{_usage_message(e)} (see `{_command_path(e)} --help`)", e.exit_code)
    except typer.Abort:  # Ctrl-C or SIGTERM; staged output was already removed
        _fail(_stopped(), _interrupted_code())
    except Interrupted as e:  # says what was kept and how to go on
        _fail(str(e), _interrupted_code())
    except MoeifyError as e:  # the message says what to do; the type says whose fault it was
        _fail(str(e), e.exit_code)
    except RecursionError:  # a JSON or YAML file nested thousands deep, read where no reader expected it
        _fail("an input file nests too deeply to read (JSON or YAML thousands of levels deep); check the files "
              "this command reads", 2)
    except OSError as e:  # the machine failed us (disk full, permissions): one line, not a traceback
        _fail(f"{e.strerror or e}{f': {e.filename}' if e.filename else ''}", 1)


def _fail(message: str, code: int) -> None:
    from moeify.ui import say

    say(f"error: {message}")
    sys.exit(code)


if __name__ == "__main__":
    main()
