"""`moeify push`: publish a moeify output folder as a Hugging Face model repo.

Examples:

    moeify push smollm2-8x135m --repo-id me/smollm2-8x135m --dry-run     # what would be uploaded
    moeify push smollm2-8x135m --repo-id me/smollm2-8x135m --private
    moeify push mixtral-upcycled --repo-id me/mixtral-upcycled --revision v1 --message "first upload"
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from moeify import ui
from moeify.card import human

FolderArg = Annotated[Path, typer.Argument(metavar="DIR", help="The output folder of a moeify conversion.")]
RepoOpt = Annotated[str, typer.Option("--repo-id", help="The model repo to create or update: USER/NAME.")]
PrivateOpt = Annotated[bool, typer.Option("--private", help="Create the repo private.")]
RevisionOpt = Annotated[str | None, typer.Option("--revision", help="Branch to upload to (created if missing).")]
MessageOpt = Annotated[str | None, typer.Option("--message", "-m", help="Commit message.")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="List the files and sizes; no network call.")]


def push(
    folder: FolderArg,
    repo_id: RepoOpt,
    private: PrivateOpt = False,
    revision: RevisionOpt = None,
    message: MessageOpt = None,
    dry_run: DryRunOpt = False,
) -> None:
    """Check that DIR is a complete moeify output, refresh its card for the repo, and upload it.

    The token comes from HF_TOKEN or `hf auth login`. README.md in DIR is rewritten for the repo
    only after the upload succeeded. Exit 2: bad input; exit 1: the Hub or the network failed.

    Examples:

    moeify push smollm2-8x135m --repo-id me/smollm2-8x135m --dry-run

    moeify push smollm2-8x135m --repo-id me/smollm2-8x135m --private --revision v1
    """
    from moeify import hub  # huggingface_hub: imported when a push runs, not for --help

    hub.check_repo_id(repo_id)  # first, dry run included: nothing is read before the id is known good
    if dry_run:
        upload = hub.complete_output(folder)
        table = Table("file", "size", title=f"would upload to {repo_id} (dry run: nothing sent)",
                      title_justify="left")
        for name, size in upload.files:
            table.add_row(name, human(size, "B"))
        table.add_row("total", human(upload.total, "B"))
        ui.show(table)
        return
    url = hub.push(folder, repo_id, private=private, revision=revision, message=message, notify=ui.say)
    ui.say(f"pushed {folder} to {url}")
