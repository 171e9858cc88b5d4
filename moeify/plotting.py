"""--plot files (train, verify): checked before the work they draw, so that a name matplotlib cannot
write is refused first, not after an hour of training."""

from __future__ import annotations

from pathlib import Path

from moeify.errors import MoeifyError


def plot_file(path: Path) -> Path:
    """The file --plot PATH writes: PATH, or PATH.png when it has no suffix (as matplotlib would name
    it). Refused in one line without matplotlib, for a format it cannot write, or for a folder."""
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:
        raise MoeifyError("--plot needs matplotlib; install it with `pip install moeify[plot]`") from None
    path = Path(path)
    if path.is_dir():
        raise MoeifyError(f"--plot {path} is a folder; name the image file to write, like {path / 'plot.png'}")
    if not path.suffix:
        return path.with_suffix(".png")
    formats = FigureCanvasBase.get_supported_filetypes()
    if path.suffix[1:].lower() not in formats:
        raise MoeifyError(f"--plot {path}: matplotlib cannot write {path.suffix} files; name a "
                          f"{', '.join(f'.{f}' for f in sorted(formats))} file")
    return path
