"""How moeify's help reads: `moeify split [OPTIONS] SOURCE`, and flags without a `<bool>` type.

Typer writes required arguments as `{SOURCE}`, optional ones as `[SOURCE]` around any metavar
(`[[SOURCE]]`), and a `<bool>` type after every flag. These classes, given to Typer as `cls=`,
keep its layout and change only those pieces, and keep example command lines unwrapped. The help
is click's plain layout (moeify.cli sets no rich markup): rich's boxes cost a tenth of a second
of imports on every `--help`, and squeezed the descriptions at 80 columns.
"""

from __future__ import annotations

from typing import Any

import typer.core


def _quiet_flags(params: list[Any]) -> None:
    """A flag takes no value, so its help shows no type."""
    for param in params:
        if getattr(param, "is_flag", False):
            param.metavar = ""


def _argument(param: Any) -> str:
    """SOURCE when required, [SOURCE] when not, a trailing ... when it repeats."""
    name = (param.metavar or param.name.upper()).strip("[]{}")
    name = name if param.required else f"[{name}]"
    return name + ("..." if param.nargs != 1 else "")


class _Help:
    """The usage line and help option shared by commands and the top-level group."""

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        arguments = [p for p in self.get_params(ctx) if p.param_type_name == "argument"]
        options = [self.options_metavar] if self.options_metavar else []
        return options + [_argument(p) for p in arguments] + self._after_arguments()

    def _after_arguments(self) -> list[str]:
        return []

    def get_help_option(self, ctx: Any) -> Any:
        option = super().get_help_option(ctx)
        if option is not None:
            _quiet_flags([option])
            # Absent, Typer's help flag is None, which it coerces through pydantic (~0.15 s to import)
            # before any command runs; False is a bool and passes as it is.
            option.default = False
        return option


def _verbatim_examples(text: str | None) -> str | None:
    """Each paragraph after "Examples:" marked for click to print as written (\\b): a command
    line re-wrapped at the terminal's width no longer pastes."""
    head, mark, tail = (text or "").partition("Examples:")
    if not mark:
        return text
    paragraphs = [p for p in tail.strip("\n").split("\n\n") if p.strip()]
    return head + mark + "\n\n" + "\n\n".join("\b\n" + p for p in paragraphs)


class Command(_Help, typer.core.TyperCommand):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _quiet_flags(self.params)
        self.help = _verbatim_examples(self.help)


class Group(_Help, typer.core.TyperGroup):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _quiet_flags(self.params)

    def _after_arguments(self) -> list[str]:
        return [self.subcommand_metavar]
