"""The output folder: written beside its final place and renamed into place only when complete."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from moeify.errors import MoeifyError


@contextmanager
def staged_output(dest: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary folder beside dest; move it into place only if the block completes.

    Any failure, Ctrl-C included, removes the temporary folder and leaves dest untouched.
    """
    dest = Path(dest).absolute()
    check_output(dest, overwrite)
    created = [p for p in (dest.parent, *dest.parent.parents) if not p.exists()]  # innermost first
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.moeify-", dir=dest.parent))
    old = staging.with_name(staging.name + "-old")
    try:
        yield staging
        staging.chmod(0o755)  # mkdtemp makes it private; a model folder is not
        if dest.exists():
            dest.rename(old)  # set aside, not deleted: Ctrl-C from here on must leave a whole output
        staging.rename(dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if old.exists() and not dest.exists():
            old.rename(dest)
        for folder in created:  # parents made for this output go too, if nothing else landed in them
            with suppress(OSError):
                folder.rmdir()
        raise
    finally:
        try:
            shutil.rmtree(old, ignore_errors=True)
        except BaseException:  # Ctrl-C while deleting the old output: finish, then let it through
            shutil.rmtree(old, ignore_errors=True)
            raise


def check_output(dest: Path, overwrite: bool) -> None:
    """Refuse an output path that is a file, or a non-empty folder without overwrite."""
    if dest.is_file():
        raise MoeifyError(f"output {dest} is an existing file; choose a folder path")
    if dest.is_dir() and any(dest.iterdir()) and not overwrite:
        raise MoeifyError(f"output folder {dest} is not empty; pass --overwrite or choose another path")
