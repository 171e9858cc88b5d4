"""The model card (README.md with YAML front matter the Hub reads) written into every output.

It is rendered from facts a finished output folder still holds (moeify.json, config.json and
the card's own front matter), so `moeify push` can render it again with the repo id.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from moeify.conversion import Result
    from moeify.spec import Spec

CARD = "README.md"
# The Hub's base_model_relation for an output whose source weights are a repo's own (we change them).
FINETUNE = "finetune"
# ... and for a source that is a quantized copy of the repo (dequantized again: the rounding stays).
QUANTIZED = "quantized"
# What a split calibrates on without --calibration (moeify/data/calibration/).
BUILTIN_CORPUS = "moeify's built-in corpus (English prose, dialogue, Python code)"


def human(count: float, unit: str = "") -> str:
    """1_234_567_890 -> '1.23B'; bytes with unit='B' -> '1.23 GB'."""
    for size, suffix in ((1e12, "T"), (1e9, "B" if not unit else "G"), (1e6, "M"), (1e3, "K")):
        if count >= size:
            return f"{count / size:.3g}{' ' if unit else ''}{suffix}{unit}"
    return f"{count:.0f}{' ' if unit else ''}{unit}"


def front_matter(path: Path) -> dict:
    """The YAML front matter of a card, or {} when it has none or it does not parse."""
    import yaml  # here and in render: a command's --help need not import it

    if not path.is_file():
        return {}
    match = re.match(r"^---\s*\n(.*?)\n---\s*\n", path.read_text(errors="replace"), re.DOTALL)
    try:
        data = yaml.safe_load(match.group(1)) if match else {}
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def source_license(source_dir: Path) -> str | None:
    """The license named in the source's own card, if it has one."""
    value = front_matter(Path(source_dir) / CARD).get("license")
    return value if isinstance(value, str) else None


def base_of(resolved: dict) -> tuple[str | None, str | None]:
    """The Hub repo whose weights the source holds, and the Hub's base_model_relation to it.

    Only what the source resolved to counts (source.provenance), not the name typed: the offline
    copy behind the smollm2-135m alias is a dequantized Q4_1 GGUF, not the repo's own weights.
    """
    if resolved.get("kind") == "hub":
        return str(resolved["repo"]), FINETUNE
    if resolved.get("kind") == "gguf" and resolved.get("repo"):
        return str(resolved["repo"]), QUANTIZED
    return None, None


@dataclass(frozen=True)
class Facts:
    """Everything the card says, all recoverable from a finished output folder."""

    title: str
    record: dict  # moeify.json: the spec plus source, target and parameter counts
    architecture: str  # the source family (llama, qwen2, ...)
    num_layers: int
    base_model: str | None = None
    relation: str = FINETUNE  # base_model_relation, when there is a base_model
    license: str | None = None
    dtype: str | None = None  # of the written weights (config.json's dtype)
    repo_id: str | None = None  # where the model lives on the Hub, once pushed
    weight_bytes: int = 0  # size of the safetensors shards


def render(facts: Facts) -> str:
    import yaml

    record = facts.record
    target = record.get("target", "unknown")
    meta: dict = {}
    if facts.base_model:
        meta["base_model"] = facts.base_model
        meta["base_model_relation"] = facts.relation
    if facts.license:
        meta["license"] = facts.license
    meta["library_name"] = "transformers"
    meta["pipeline_tag"] = "text-generation"
    meta["tags"] = list(dict.fromkeys(["moe", "moeify", target, facts.architecture, record.get("mode", "upcycle")]))
    return f"""---
{yaml.safe_dump(meta, sort_keys=False).strip()}
---

# {facts.title}

A Mixture-of-Experts model made from {_source_link(record.get("source", "?"), facts.base_model)} by
moeify {record.get("moeify_version", "")} ({record.get("mode", "upcycle")}). The chosen layers' FFNs
became experts behind a new router; attention, norms and embeddings are the source's, unchanged.
{_provenance(record)}

## Conversion

| | |
|---|---|
{_table(_conversion_rows(facts))}

## Parameters

{_parameters(record, facts.weight_bytes)}

## Use

```python
{_usage(facts.repo_id or facts.title, target == "remote")}
```
{_remote_note(target)}
## Before you rely on it

{_caveat(record.get("mode", "upcycle"))}

## Reproduce

`moeify.json` records the conversion and is itself a recipe:

```bash
moeify apply moeify.json {record.get("source", "SOURCE")} --output {facts.title}
```
"""


def _source_link(source: str, base: str | None) -> str:
    return f"[`{base}`](https://huggingface.co/{base})" if base else f"`{source}`"


def _conversion_rows(facts: Facts) -> list[tuple[str, str]]:
    from moeify.spec import Spec

    record = facts.record
    spec = Spec.from_dict({f.name: record[f.name] for f in fields(Spec) if f.name in record})
    moe_layers = record.get("moe_layer_indices", [])
    rows = [
        ("source", f"`{record.get('source')}` ({facts.architecture})"),
        ("method", spec.mode.value),
        ("output architecture", record.get("target", "?")),
        *([("runs exactly in", _engines(record["engines"]))] if isinstance(record.get("engines"), dict) else []),
        ("routed experts per MoE layer", f"{spec.routed_experts} ({spec.experts} × granularity {spec.granularity})"),
        ("active routed experts per token", str(spec.active_experts)),
        ("shared experts", str(spec.shared_experts)),
        ("MoE layers", f"{len(moe_layers)} of {facts.num_layers} ({spec.moe_layers})"),
    ]
    if spec.mode.value == "split":
        rows += [("partition / router", f"{spec.partition.value} / {spec.split_router.value}"),
                 ("calibration", _calibration(spec))]
        if spec.refit:
            rows.append(("down projections", "refitted by least squares to the dense FFN (--refit)"))
    else:
        rows += [("router init", f"{spec.router_init.value} (std {spec.router_std})"),
                 ("noise / drop ratio", f"{spec.noise} / {spec.drop_ratio}")]
    return rows + [("seed", str(spec.seed)), ("dtype", _dtype(spec.dtype.value, facts.dtype)),
                   ("moeify version", str(record.get("moeify_version", "?")))]


def _calibration(spec: Spec) -> str:
    from moeify.split import needs_calibration

    if not needs_calibration(spec):
        return "none needed: every piece is active"
    return f"{spec.calibration or BUILTIN_CORPUS} ({spec.calibration_tokens} tokens)"


def _dtype(asked: str, written: str | None) -> str:
    if not written:
        return asked
    return f"{written} (the source's)" if asked == "auto" else written


def _provenance(record: dict) -> str:
    from moeify.source import describe

    resolved = record.get("resolved")
    if not isinstance(resolved, dict):
        return ""
    line = f"\nThe source's weights: {describe(resolved)}."
    if resolved.get("kind") == "gguf":
        line += (" They are not the original weights: quantization rounded them, and dequantizing "
                 "does not bring the lost precision back.")
    return line + "\n"


def _engines(recorded: dict) -> str:
    from moeify import engines

    return engines.line(engines.from_record(recorded)).replace("|", "/")  # a table cell


def _parameters(record: dict, weight_bytes: int) -> str:
    total, active = record.get("total_params", 0), record.get("active_params", 0)
    return (f"| total | active per token | weights on disk |\n|---|---|---|\n"
            f"| {human(total)} | {human(active)} | {human(weight_bytes, 'B')} |")


def _table(rows: list[tuple[str, str]]) -> str:
    return "\n".join(f"| {key} | {value} |" for key, value in rows)


def _usage(repo: str, remote: bool) -> str:
    # Both: AutoTokenizer reads config.json too, and with an auto_map it asks on stdin otherwise.
    extra = ", trust_remote_code=True" if remote else ""
    return f"""from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{repo}"{extra})
tokenizer = AutoTokenizer.from_pretrained("{repo}"{extra})
inputs = tokenizer("The capital of France is", return_tensors="pt")
print(tokenizer.decode(model.generate(**inputs, max_new_tokens=20)[0]))"""


def _remote_note(target: str) -> str:
    if target != "remote":
        return ""
    return ("\nThe MoE blocks are moeify's own code, shipped in this repo (`configuration_moeify.py`, "
            "`modeling_moeify.py`): loading needs `trust_remote_code=True`; read them first.\n")


def _caveat(mode: str) -> str:
    if mode == "split":
        return ("A training-free split only approximates the dense source when fewer than all pieces are "
                "active; measure it with `moeify verify SOURCE THIS_MODEL` and fine-tune before relying on it.")
    return ("An upcycled model starts out computing what its dense source did (before any noise or "
            "Drop-Upcycling): its experts are copies, so it needs further training before its experts "
            "specialise and it can do better than the source.")


# ---------------------------------------------------------------------------- writing


def weight_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


def write(folder: Path, result: Result, source_config: dict, source_dir: Path) -> None:
    """The card of a conversion being written into folder (moeify.json may not exist yet)."""
    from moeify.conversion import record

    base, relation = base_of(result.resolved)
    config = json.loads((Path(folder) / "config.json").read_text())  # written before the card
    facts = Facts(title=Path(result.output).name, record=record(result),
                  architecture=source_config.get("model_type", "unknown"), num_layers=result.num_layers,
                  base_model=base, relation=relation or FINETUNE,
                  license=result.resolved.get("license") or source_license(source_dir),
                  dtype=_config_dtype(config), weight_bytes=weight_bytes(folder))
    (Path(folder) / CARD).write_text(render(facts))


def refresh(folder: Path, repo_id: str) -> None:
    """Render the card of a finished output again for its Hub repo, and write it."""
    (Path(folder) / CARD).write_text(refreshed(folder, repo_id))


def refreshed(folder: Path, repo_id: str) -> str:
    """The card of a finished output rendered again for its Hub repo (keeps license and base model).

    In memory: `moeify push` writes it into the folder only once the upload succeeded. A
    moeify.json or config.json that is not what moeify wrote is one MoeifyError, not a traceback.
    """
    from moeify.anatomy import describe
    from moeify.errors import MoeifyError

    folder = Path(folder)
    old = front_matter(folder / CARD)
    record, config = (_json_object(folder / name) for name in ("moeify.json", "config.json"))
    try:
        base_config = config.get("base_config") if isinstance(config.get("base_config"), dict) else None
        tags = old.get("tags") if isinstance(old.get("tags"), list) else []
        known = [t for t in tags if t not in ("moe", "moeify", record.get("target"), record.get("mode"))]
        architecture = (base_config or {}).get("model_type") or (known[0] if known else config.get("model_type"))
        facts = Facts(title=repo_id.split("/")[-1], record=record, architecture=str(architecture),
                      num_layers=len(describe(config).blocks), base_model=old.get("base_model"),
                      relation=str(old.get("base_model_relation") or FINETUNE), license=old.get("license"),
                      dtype=_config_dtype(config), repo_id=repo_id, weight_bytes=weight_bytes(folder))
        return render(facts)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise MoeifyError(f"{folder}/moeify.json or config.json is not what moeify wrote ({type(e).__name__}: {e}); "
                          f"convert again") from None


def _config_dtype(config: dict) -> str | None:
    value = config.get("dtype") or config.get("torch_dtype")
    return value if isinstance(value, str) else None


def _json_object(path: Path) -> dict:
    from moeify.errors import MoeifyError

    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MoeifyError(f"cannot read {path} ({e}); convert again") from None
    if not isinstance(data, dict):
        raise MoeifyError(f"{path} is not a JSON object; convert again")
    return data
