"""The model card (README.md with YAML front matter) written into every output."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

if TYPE_CHECKING:
    from moeify.conversion import Result


def human(count: float, unit: str = "") -> str:
    """1_234_567_890 -> '1.23B'; bytes with unit='B' -> '1.23 GB'."""
    for size, suffix in ((1e12, "T"), (1e9, "B" if not unit else "G"), (1e6, "M"), (1e3, "K")):
        if count >= size:
            return f"{count / size:.3g}{' ' if unit else ''}{suffix}{unit}"
    return f"{count:.0f}{' ' if unit else ''}{unit}"


def source_license(source_dir: Path) -> str | None:
    """The license named in the source's own card, if it has one."""
    front = front_matter(source_dir / "README.md")
    value = front.get("license")
    return value if isinstance(value, str) else None


def front_matter(path: Path) -> dict:
    if not path.is_file():
        return {}
    match = re.match(r"^---\s*\n(.*?)\n---\s*\n", path.read_text(errors="replace"), re.DOTALL)
    try:
        data = yaml.safe_load(match.group(1)) if match else {}
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def hub_id(source: str) -> str | None:
    """The Hub repo id of a source, when it names one (local paths have none)."""
    from moeify.source import hub_repo_of

    return hub_repo_of(source)


def render(result: Result, source_config: dict, source_dir: Path) -> str:
    spec = result.spec
    meta: dict = {}
    base = hub_id(result.source)
    if base:
        meta["base_model"] = base
        meta["base_model_relation"] = "finetune"
    license_ = source_license(source_dir)
    if license_:
        meta["license"] = license_
    meta["library_name"] = "transformers"
    meta["pipeline_tag"] = "text-generation"
    meta["tags"] = ["moe", "moeify", result.target, source_config.get("model_type", "unknown")]
    loads_remote = result.target == "remote"
    rows = [
        ("source", f"`{result.source}` ({source_config.get('model_type')})"),
        ("method", spec.mode.value),
        ("output architecture", result.target),
        ("routed experts per MoE layer", f"{spec.routed_experts} ({spec.experts} × granularity {spec.granularity})"),
        ("active routed experts per token", str(spec.active_experts)),
        ("shared experts", str(spec.shared_experts)),
        ("MoE layers", f"{len(result.moe_layers)} of {result.num_layers} ({spec.moe_layers})"),
        ("router init", f"{spec.router_init.value} (std {spec.router_std})"),
        ("noise / drop ratio", f"{spec.noise} / {spec.drop_ratio}"),
        ("seed", str(spec.seed)),
        ("total parameters", human(result.total_params)),
        ("active parameters per token", human(result.active_params)),
    ]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    repo = "path/to/this/model"
    load = (f'AutoModelForCausalLM.from_pretrained("{repo}", trust_remote_code=True)' if loads_remote
            else f'AutoModelForCausalLM.from_pretrained("{repo}")')
    return f"""---
{yaml.safe_dump(meta, sort_keys=False).strip()}
---

# {Path(result.output).name}

A Mixture-of-Experts model made from `{result.source}` by [moeify](https://pypi.org/project/moeify/)
{spec.mode.value}. Every FFN of the chosen layers became experts behind a new router; attention,
norms and embeddings are the source's, unchanged.

| | |
|---|---|
{table}

## Use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = {load}
tokenizer = AutoTokenizer.from_pretrained("{repo}")
```

## Before you rely on it

An upcycled model starts out computing what its dense source did (before any noise or
Drop-Upcycling): its experts are copies, so it needs further training to benefit from them.
`moeify.json` records the conversion; `moeify apply moeify.json SOURCE` replays it.
"""


def write(folder: Path, result: Result, source_config: dict, source_dir: Path) -> None:
    (folder / "README.md").write_text(render(result, source_config, source_dir))
