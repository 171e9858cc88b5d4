"""`moeify inspect` fills what config.json leaves out from anatomy.DEFAULTS, without importing transformers
or torch, and counts exactly what transformers' own config classes would have it count."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from transformers import AutoConfig

from moeify import anatomy
from tests.fixtures import TINY
from tests.test_inspect import MOE_SMALL, NATIVE_MOE

SMALL = TINY | {family: MOE_SMALL | fields for family, fields in NATIVE_MOE.items()} | {
    "granitemoe": MOE_SMALL | dict(num_local_experts=4, num_experts_per_tok=2),
    "granitemoeshared": MOE_SMALL | dict(num_local_experts=4, num_experts_per_tok=2, shared_intermediate_size=24),
}
FAMILIES = sorted(set(anatomy.DEFAULTS) - {"deepseek"})  # DeepSeekMoE is remote code: transformers has no config
DERIVED = ("num_key_value_heads", "head_dim")  # transformers computes these from other fields in some families

# Runs `moeify inspect FOLDER --json` for each folder in one child process, then reports what it imported.
CHILD = '''
import contextlib, io, json, sys
from moeify import cli

reports = {}
for folder in sys.argv[1:]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            cli.main(["inspect", folder, "--json"])
        except SystemExit as e:
            assert e.code == 0, (folder, e.code)
    reports[folder] = json.loads(out.getvalue())
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers"))
print(json.dumps({"reports": reports, "imported": heavy}))
'''


def minimal(family: str, **fields) -> dict:
    """config.json as transformers' config class would write it, less every field equal to the class default."""
    config = AutoConfig.for_model(family, **fields).to_dict()
    defaults = AutoConfig.for_model(family).to_dict()
    return {"model_type": family} | {k: v for k, v in config.items() if k not in defaults or v != defaults[k]}


def cases() -> dict[str, dict]:
    """Per family: nothing but model_type; a small model's non-default fields; the same without the fields
    transformers derives (key-value heads, head_dim), as an older config.json may lack them."""
    found = {}
    for family in FAMILIES:
        found[f"{family}-defaults"] = {"model_type": family}
        found[f"{family}-small"] = minimal(family, **SMALL[family])
        found[f"{family}-derived"] = {"model_type": family} | {k: v for k, v in SMALL[family].items()
                                                               if k not in DERIVED}
    return found


def figures(report: dict) -> dict:
    return {k: report[k] for k in ("architecture", "kind", "num_layers", "hidden_size", "layers", "total_params",
                                   "active_params")}


def through_transformers(config: dict, monkeypatch) -> dict:
    """The figures as anatomy reads them when transformers fills every missing field."""
    from moeify.commands.inspect import _anatomy

    with monkeypatch.context() as patch:
        patch.setattr(anatomy, "DEFAULTS", {})
        return figures(_anatomy(anatomy.describe(config)) | {"source": ""})


def test_every_family_in_the_table_is_one_moeify_inspects():
    assert set(anatomy.DEFAULTS) == set(anatomy.LAYOUTS)


def test_defaults_equal_transformers_and_neither_is_imported(tmp_path, monkeypatch):
    folders = {}
    for name, config in cases().items():
        folders[name] = tmp_path / name
        folders[name].mkdir()
        (folders[name] / "config.json").write_text(json.dumps(config))
    env = os.environ | {"HF_HUB_OFFLINE": "1"}
    child = subprocess.run([sys.executable, "-c", CHILD, *map(str, folders.values())], env=env,
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stderr
    answer = json.loads(child.stdout)
    assert answer["imported"] == []
    for name, folder in folders.items():
        config = json.loads((folder / "config.json").read_text())
        assert figures(answer["reports"][str(folder)]) == through_transformers(config, monkeypatch), name


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_an_explicit_null_is_not_replaced_by_a_default(family, monkeypatch):
    """null in config.json: transformers derives key-value heads from the heads, as anatomy does."""
    config = {"model_type": family, "num_attention_heads": 8, "num_key_value_heads": None}
    found = anatomy.describe(config)
    assert found.total == anatomy.describe(config | {"num_key_value_heads": 8}).total
    monkeypatch.setattr(anatomy, "DEFAULTS", {})
    assert found.total == anatomy.describe(config).total
