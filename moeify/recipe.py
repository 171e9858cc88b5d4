"""Recipes: one conversion in a YAML file, validated into the same Spec the CLI builds.

An output's moeify.json is a recipe too: the keys it adds beside the spec (where the conversion
came from and what it made) are recognised and set aside, so replaying it gives the same Spec.
"""

from __future__ import annotations

import json
from dataclasses import fields
from enum import Enum
from pathlib import Path
from typing import Any

import yaml

from moeify.errors import MoeifyError
from moeify.spec import Spec

# What conversion.record adds to the spec in moeify.json: provenance, not instructions.
RECORD_KEYS = frozenset({"source", "moeify_version", "target", "moe_layer_indices", "total_params", "active_params",
                         "engines"})
# The recipes moeify ships, usable by name (`moeify apply mixtral SOURCE ...`).
SHIPPED = Path(__file__).resolve().parent / "recipes"  # also reachable as recipes/ at the repo root


def shipped() -> dict[str, Path]:
    return {path.stem: path for path in sorted(SHIPPED.glob("*.yaml"))}


def find(name: str) -> Path:
    """A recipe file by path, or by the name of a shipped recipe."""
    path = Path(name).expanduser()
    if path.is_file():
        return path
    if name in shipped():
        return shipped()[name]
    known = ", ".join(shipped()) or "none found"
    raise MoeifyError(f"recipe {name!r} is neither a file nor a shipped recipe ({known})")


def read(path: Path) -> dict[str, Any]:
    """The raw mapping of a recipe file (YAML, or the JSON of a moeify.json)."""
    text = Path(path).read_text()
    try:
        data = json.loads(text) if Path(path).suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise MoeifyError(f"cannot read recipe {path}: {str(e).splitlines()[0]}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise MoeifyError(f"recipe {path} must be a mapping of conversion fields (like experts: 8)")
    return data


def spec_of(data: dict[str, Any], overrides: dict[str, Any] | None = None) -> Spec:
    """Validate a recipe's fields, with command-line overrides on top, into a Spec."""
    fields_ = {k: v for k, v in data.items() if k not in RECORD_KEYS} | (overrides or {})
    for name, value in fields_.items():
        _check_type(name, value)
    floats = {f.name for f in fields(Spec) if isinstance(f.default, float)}
    fields_ = {k: float(v) if k in floats else v for k, v in fields_.items()}
    return Spec.from_dict(fields_)  # unknown keys: one error naming them


def load(path: Path, overrides: dict[str, Any] | None = None) -> Spec:
    return spec_of(read(path), overrides)


def parse_assignments(pairs: list[str]) -> dict[str, Any]:
    """--set FIELD=VALUE pairs, each value read as YAML (8 -> int, 0.5 -> float, activation -> str)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise MoeifyError(f"--set {pair!r} is not FIELD=VALUE (e.g. --set partition=cluster)")
        out[name.strip().replace("-", "_")] = yaml.safe_load(value) if value.strip() else None
    return out


def _check_type(name: str, value: Any) -> None:
    """A wrong type in YAML (experts: eight) gets a line naming the field, not a TypeError."""
    default = {f.name: f.default for f in fields(Spec)}.get(name)
    if default is None or isinstance(default, Enum):
        return  # unknown fields are named by Spec.from_dict; enums are checked by the Spec
    expected: tuple[type, ...] = (int, float) if isinstance(default, float) else (type(default),)
    if isinstance(value, bool) and not isinstance(default, bool) or not isinstance(value, expected):
        kind = {int: "a whole number", float: "a number", str: "text", bool: "true or false"}[type(default)]
        raise MoeifyError(f"recipe field {name} must be {kind} (got {value!r})")
