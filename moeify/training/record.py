"""What a trained output says about its training: the entry appended to moeify.json's
`training` list and the card's Training section. Like the conversion record, it names local
models and files without their paths (a model by its folder name, data by file name and sha256)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from moeify import __version__, source

if TYPE_CHECKING:
    from moeify.training.plan import Plan
    from moeify.training.trainer import Outcome


def entry(plan: Plan, o: Outcome, processes: int) -> dict:
    settings = plan.settings.to_dict()
    for key in ("data", "eval_text", "teacher"):
        if settings[key] is not None:
            settings[key] = _name(settings[key])
    teacher = source.provenance(plan.teacher_dir) if plan.teacher_dir else None
    return {"model": _name(plan.model), "teacher": _name(plan.teacher) if plan.teacher else None,
            "teacher_resolved": teacher, "data_sha256": plan.run["data_sha256"], "settings": settings,
            "steps": o.steps, "tokens": o.tokens, "seconds": round(o.seconds, 2), "processes": processes,
            "perplexity_before": o.before, "perplexity_after": o.after, "teacher_perplexity": o.teacher_perplexity,
            "moeify_version": __version__}


def section(plan: Plan, o: Outcome) -> str:
    s, teacher = plan.settings, o.teacher_perplexity
    ratio = f" (×{o.before / teacher:.3f} → ×{o.after / teacher:.3f} of the teacher's {teacher:.3f})" if teacher else ""
    trained = f"{s.train.value} ({o.trainable_params:,} parameters)" + (f", frozen: {', '.join(s.freeze)}"
                                                                       if s.freeze else "")
    if s.objective.value == "local":
        objective = f"local: each MoE layer reproduces `{_name(plan.teacher)}`'s FFN on its hidden states"
    else:
        distill = f"distill {s.distill:g} (T {s.temperature:g}, teacher `{_name(plan.teacher)}`), " if s.distill else ""
        objective = f"{distill}lm {s.lm:g}, aux {s.aux:g}"
    rows = [("data", f"`{_name(s.data)}` (sha256 `{plan.run['data_sha256'][:16]}…`)"), ("trained", trained),
            ("objective", objective), ("steps / tokens", f"{o.steps} / {o.tokens:,}"),
            ("held-out perplexity", f"{o.before:.3f} → {o.after:.3f}{ratio}")]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return (f"## Training\n\nTrained further with `moeify train` (its settings are in moeify.json's `training`, "
            f"the curve in train_log.jsonl):\n\n| | |\n|---|---|\n{table}\n")


def _name(what: str) -> str:
    """An alias or Hub id as typed; a local path as its last component."""
    return source.public_name(what, {}) if not Path(what).expanduser().exists() else Path(what).resolve().name
