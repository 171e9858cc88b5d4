"""Recipes: one conversion in a YAML file, validated into the same Spec the CLI builds.

An output's moeify.json is a recipe too: the keys it adds beside the spec (where the conversion
came from and what it made) are recognised and set aside, so replaying it gives the same Spec.
"""

from __future__ import annotations

import json
import reprlib
from dataclasses import fields
from enum import Enum
from functools import cache
from pathlib import Path
from typing import Any

from moeify.errors import MoeifyError
from moeify.spec import Spec

# What conversion.record adds to the spec in moeify.json: provenance, not instructions.
RECORD_KEYS = frozenset({"source", "moeify_version", "target", "moe_layer_indices", "total_params", "active_params",
                         "engines", "resolved"})
# What some conversions add to moeify.json beside those: a merge's routing report, an expansion's facts.
# training: moeify train's records; train: a recipe's train section, read by moeify.commands.train.
NOTE_KEYS = frozenset({"routing", "expansion", "training", "train"})
# The recipes moeify ships, usable by name (`moeify apply mixtral SOURCE ...`).
SHIPPED = Path(__file__).resolve().parent / "recipes"  # also reachable as recipes/ at the repo root
MAX_BYTES = 2**20  # a recipe is a few lines, a moeify.json about a kilobyte: 1 MiB is plenty


@cache
def _loader() -> type:
    """yaml.safe_load's loader without aliases: a recipe is a few plain fields, and aliases (*name)
    are how a few lines of YAML expand into gigabytes (the "billion laughs"). Made on first use:
    yaml is not imported for a command's --help."""
    import yaml

    class Loader(yaml.SafeLoader):
        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                raise yaml.YAMLError(f"found the alias *{event.anchor} on line {event.start_mark.line + 1}; recipes "
                                     f"do not use YAML anchors and aliases (&name, *name): write each value out")
            return super().compose_node(parent, index)

    return Loader


def shipped() -> dict[str, Path]:
    return {path.stem: path for path in sorted(SHIPPED.glob("*.yaml"))}


def find(name: str) -> Path:
    """A recipe file by path, or a shipped recipe by name (`split`) or by its path in the repo
    (`recipes/split.yaml`), which then works from any directory."""
    path = Path(name).expanduser()
    if path.is_file():
        return path
    if name in shipped():
        return shipped()[name]
    if path.parent in (Path("recipes"), Path(".")) and path.suffix == ".yaml" and path.stem in shipped():
        return shipped()[path.stem]
    known = ", ".join(shipped()) or "none found"
    raise MoeifyError(f"recipe {name!r} is neither a file nor a shipped recipe ({known}; they are in {SHIPPED})")


def read(path: Path) -> dict[str, Any]:
    """The raw mapping of a recipe file (YAML, or the JSON of a moeify.json)."""
    text = _text(Path(path))
    data = _parse(text, f"recipe {path}", json.loads if Path(path).suffix == ".json" else None)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise MoeifyError(f"recipe {path} must be a mapping of conversion fields (like experts: 8)")
    return data


def spec_of(data: dict[str, Any], overrides: dict[str, Any] | None = None) -> Spec:
    """Validate a recipe's fields, with command-line overrides on top, into a Spec."""
    overrides = overrides or {}
    if "source" in overrides:
        raise MoeifyError("--set source=... is not a conversion field; give the source as the SOURCE argument")
    if "train" in overrides:
        raise MoeifyError("--set train=... cannot replace the train: section; set its fields one by one with "
                          "--set train.FIELD=VALUE")
    fields_ = {k: v for k, v in data.items() if k not in RECORD_KEYS | NOTE_KEYS} | overrides
    for name, value in fields_.items():
        _check_type(name, value)
    # unknown keys: one error naming them; numbers checked (and made floats) there
    return Spec.from_dict(fields_, also=("source", "train"))


def load(path: Path, overrides: dict[str, Any] | None = None) -> Spec:
    return spec_of(read(path), overrides)


def parse_assignments(pairs: list[str]) -> dict[str, Any]:
    """--set FIELD=VALUE pairs, each value read as YAML (8 -> int, 0.5 -> float, activation -> str)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise MoeifyError(f"--set {pair!r} is not FIELD=VALUE (e.g. --set partition=cluster)")
        out[name.strip().replace("-", "_")] = _parse(value, f"--set {pair!r}") if value.strip() else None
    return out


def _text(path: Path) -> str:
    """A recipe file's text, refused when it is too large to be a recipe or not UTF-8."""
    with open(path, "rb") as f:
        raw = f.read(MAX_BYTES + 1)  # never more: a recipe given as a 2 GB file is not read whole
    if len(raw) > MAX_BYTES:
        raise MoeifyError(f"recipe {path} is over 1 MiB; a recipe is a few lines of fields like experts: 8")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise MoeifyError(f"recipe {path} is not UTF-8 text; give a YAML recipe or a moeify.json") from None


def _parse(text: str, what: str, loads=None) -> Any:
    """YAML (safe, no aliases) or, with loads=json.loads, JSON; any failure is one line naming `what`."""
    import yaml

    try:
        return loads(text) if loads else yaml.load(text, Loader=_loader())  # a SafeLoader
    except (ValueError, yaml.YAMLError) as e:  # ValueError: bad JSON, or an integer past 4300 digits
        first = str(e).splitlines()[0].split("; use sys.set_int_max_str_digits")[0]  # not a user's knob
        raise MoeifyError(f"cannot read {what}: {first}") from None
    except RecursionError:
        raise MoeifyError(f"cannot read {what}: nested too deeply; a recipe is a flat mapping of fields") from None


def _check_type(name: str, value: Any) -> None:
    """A wrong type in YAML (experts: eight) gets a line naming the field, not a TypeError."""
    default = {f.name: f.default for f in fields(Spec)}.get(name)
    if default is None or isinstance(default, Enum):
        return  # unknown fields are named by Spec.from_dict; enums are checked by the Spec
    expected: tuple[type, ...] = (int, float) if isinstance(default, float) else (type(default),)
    if isinstance(value, bool) and not isinstance(default, bool) or not isinstance(value, expected):
        kind = {int: "a whole number", float: "a number", str: "text", bool: "true or false"}[type(default)]
        raise MoeifyError(f"recipe field {name} must be {kind} (got {reprlib.repr(value)})")
