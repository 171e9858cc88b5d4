"""In-progress checkpoints: accelerate's save_state into a folder beside the output.

The output folder itself is written once, at the end, through the staged output; checkpoints
live in their own folder (default DIR.checkpoints) as step-NNNNNNNN/ folders. Each is written
under a hidden .partial name and renamed when complete, so a kill at any moment leaves the
last complete checkpoint usable and never a half-written one under a real name. Each carries
moeify_state.json: how far the run got and what it was (model, data, settings), so --resume
refuses a checkpoint of another run.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from moeify.errors import MoeifyError

STATE = "moeify_state.json"
LOG = "train_log.jsonl"  # the run's log, beside its checkpoints until the output is written
_NAME = re.compile(r"^step-(\d{8})$")


@dataclass
class Progress:
    """How far a run got; saved with each checkpoint."""

    step: int = 0  # optimizer steps done
    tokens: int = 0  # training tokens seen, over all processes
    seconds: float = 0.0  # training time so far, over every resumed part
    evaluations: list[dict] = field(default_factory=list)  # {"step", "perplexity"} of each held-out score


class Checkpoints:
    def __init__(self, folder: Path, keep: int):
        self.folder, self.keep = Path(folder), keep

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.folder.is_dir():
            return []
        return sorted((p for p in self.folder.iterdir() if _NAME.match(p.name) and (p / STATE).is_file()),
                      key=lambda p: p.name)

    def latest(self) -> Path | None:
        found = self.complete()
        return found[-1] if found else None

    def identity(self, path: Path) -> dict:
        return _state(path)["run"]

    def progress(self, path: Path) -> Progress:
        return _state(path)["progress"]

    def check_resumable(self, run: dict) -> Path:
        """The latest checkpoint, if it belongs to this run; one line naming what differs otherwise."""
        latest = self.latest()
        if latest is None:
            raise MoeifyError(f"--resume: no complete checkpoint in {self.folder}; start without --resume")
        saved = self.identity(latest)
        differ = [key for key in sorted(set(saved) | set(run)) if saved.get(key) != run.get(key)]
        if differ:
            detail = "; ".join(f"{k}: {_short(saved.get(k))} then, {_short(run.get(k))} now" for k in differ[:3])
            raise MoeifyError(f"--resume: {latest} is from another run ({detail}); resume with the same model, "
                              f"data and settings, or start over: --overwrite without --resume")
        return latest

    def clear(self) -> None:
        """Remove what an earlier run left (checkpoints, partial saves, its log), and nothing else:
        --checkpoint-dir may name a folder that holds other files too."""
        if not self.folder.is_dir():
            return
        for path in self.folder.iterdir():
            if _NAME.match(path.name) or path.name.startswith(".step-"):
                shutil.rmtree(path, ignore_errors=True)
            elif path.name == LOG:
                path.unlink()

    def drop_partial(self) -> None:
        if self.folder.is_dir():
            for leftover in self.folder.glob(".step-*.partial"):
                shutil.rmtree(leftover, ignore_errors=True)

    def save(self, accelerator, progress: Progress, run: dict) -> Path:
        """accelerate's full state (model, optimizer, scheduler, RNG of every process) as step-N."""
        name = f"step-{progress.step:08d}"
        final, partial = self.folder / name, self.folder / f".{name}.partial"
        if accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
            self.folder.mkdir(parents=True, exist_ok=True)
        accelerator.wait_for_everyone()
        try:
            # Pickled, not safetensors: the remote format's experts become views of one stacked
            # tensor once it has run without gradients (evaluation), and safetensors would keep
            # only one tensor per storage.
            accelerator.save_state(str(partial), safe_serialization=False)
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                (partial / STATE).write_text(json.dumps({"run": run, "progress": asdict(progress)}, indent=2))
                shutil.rmtree(final, ignore_errors=True)
                partial.rename(final)
                for old in self.complete()[:-self.keep]:
                    shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            if accelerator.is_main_process:
                shutil.rmtree(partial, ignore_errors=True)
            raise
        accelerator.wait_for_everyone()
        return final


def damaged(path: Path, why: str) -> MoeifyError:
    return MoeifyError(f"checkpoint {path} is damaged ({why}); start over with --overwrite (without --resume), "
                       f"or delete that step folder to resume from the one before")


def _state(path: Path) -> dict:
    """moeify_state.json of a checkpoint, checked: {"run": dict, "progress": Progress}."""
    try:
        state = json.loads((path / STATE).read_text())
        run, saved = state["run"], state["progress"]
        progress = Progress(**saved)
    except (ValueError, KeyError, TypeError, RecursionError) as e:  # not OSError: a disk's trouble is its own
        raise damaged(path, f"its {STATE} is unreadable: {type(e).__name__}") from None
    counts = (progress.step, progress.tokens)
    if not isinstance(run, dict) or not all(isinstance(n, int) and n >= 0 for n in counts) \
            or not isinstance(progress.seconds, (int, float)) or not isinstance(progress.evaluations, list):
        raise damaged(path, f"its {STATE} holds values of the wrong kind")
    return {"run": run, "progress": progress}


def _short(value) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "..."
