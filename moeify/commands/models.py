"""`moeify models`: the short aliases moeify understands.

Example:

    moeify models
"""

from __future__ import annotations

from rich.table import Table

from moeify import source, ui


def models() -> None:
    """List the aliases accepted wherever a SOURCE is expected.

    Examples:

    moeify models | grep qwen
    """
    table = Table("alias", "Hub repo", title="moeify aliases", title_justify="left")
    for alias, repo in source.ALIASES.items():
        note = " (works offline: PyPI fallback)" if alias == source.FALLBACK_ALIAS else ""
        table.add_row(alias, repo + note)
    ui.show(table)
