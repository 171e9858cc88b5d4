"""What a person sees while a run trains, and the train_log.jsonl beside it. Main process only."""

from __future__ import annotations

import json
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from moeify.card import human
from moeify.training.checkpoints import Checkpoints
from moeify.ui import console


class Bar:
    """A progress bar over optimizer steps: step, tokens/s, loss terms, learning rate, ETA."""

    def __init__(self, total: int, done: int, enabled: bool):
        self.enabled = enabled
        if not enabled:
            return
        self.progress = Progress(TextColumn("training"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[line]}"), TimeRemainingColumn(),
                                 console=console, transient=True)
        self.task = self.progress.add_task("training", total=total, completed=done, line="")

    def __enter__(self) -> Bar:
        if self.enabled:
            self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self.progress.stop()

    def update(self, step: int, line: str) -> None:
        if self.enabled:
            self.progress.update(self.task, completed=step, line=line)


def line(terms: dict[str, float], lr: float, tokens_per_second: float) -> str:
    shown = " ".join(f"{name} {value:.4g}" for name, value in terms.items())
    return f"{human(tokens_per_second)} tok/s  {shown}  lr {lr:.3g}"


class Journal:
    """train_log.jsonl: one JSON object per logged step (and per evaluation)."""

    def __init__(self, path: Path, enabled: bool, resumed_at: int):
        self.path, self.enabled = path, enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._truncate(resumed_at)

    def _truncate(self, step: int) -> None:
        """Keep what the resumed checkpoint had already logged; later lines are replayed."""
        if not self.path.is_file():
            return
        kept = [row for row in self.path.read_text().splitlines() if row and json.loads(row).get("step", 0) <= step]
        self.path.write_text("".join(row + "\n" for row in kept))

    def write(self, row: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")


def summary(outcome) -> Table:
    """The closing table: tokens, time, held-out perplexity before -> after, ratio to the teacher."""
    table = Table(title=str(outcome.output), show_header=False, title_justify="left")
    table.add_row("trained", f"{outcome.trainable} ({human(outcome.trainable_params)} parameters)")
    table.add_row("steps", f"{outcome.steps} ({human(outcome.tokens)} tokens)")
    table.add_row("time", f"{outcome.seconds:.1f} s ({human(outcome.tokens / max(outcome.seconds, 1e-9))} tok/s)")
    table.add_row("held-out perplexity", f"{outcome.before:.3f} -> {outcome.after:.3f}")
    if outcome.teacher_perplexity:
        t = outcome.teacher_perplexity
        table.add_row("ratio to teacher", f"×{outcome.before / t:.3f} -> ×{outcome.after / t:.3f} (teacher {t:.3f})")
    saved = Checkpoints(outcome.checkpoints, keep=1).latest() is not None
    table.add_row("checkpoints", str(outcome.checkpoints) if saved else "none saved")
    return table


def plot(log: Path, path: Path) -> Path:
    """A PNG of train_log.jsonl: each loss term (left) and held-out perplexity (right) over steps."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(log).read_text().splitlines() if line]
    steps = [row for row in rows if "loss" in row]
    evals = [row for row in rows if "eval_perplexity" in row]
    terms = [k for k in steps[0] if k not in ("step", "tokens", "lr", "seconds")] if steps else []
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for term in terms:  # each term unweighted; "loss" is the weighted total
        left.plot([r["step"] for r in steps], [r[term] for r in steps], label=term)
    left.set(xlabel="step", ylabel="value (log scale)", title="loss terms", yscale="log")
    left.legend()
    right.plot([r["step"] for r in evals], [r["eval_perplexity"] for r in evals], marker="o")
    right.set(xlabel="step", ylabel="perplexity", title="held-out perplexity")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
