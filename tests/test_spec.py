"""spec.py: one validated, frozen description of a conversion, and its round trip through JSON."""

from __future__ import annotations

import dataclasses
import json

import pytest

from moeify.errors import MoeifyError
from moeify.spec import DType, Format, Mode, RouterInit, Spec, parse_layers, parse_size


def test_defaults_are_a_valid_upcycle():
    spec = Spec()
    assert spec.mode is Mode.UPCYCLE
    assert (spec.experts, spec.topk, spec.granularity) == (8, 2, 1)
    assert spec.noise == 0 and spec.drop_ratio == 0
    assert spec.dtype is DType.AUTO and spec.format is Format.AUTO and spec.router_init is RouterInit.RANDOM


def test_frozen():
    spec = Spec()
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.experts = 4  # type: ignore[misc]
    changed = spec.replace(experts=4)
    assert changed.experts == 4 and spec.experts == 8


def test_strings_become_enums():
    spec = Spec(dtype="bfloat16", router_init="zeros", format="native", mode="upcycle")
    assert spec.dtype is DType.BFLOAT16
    assert spec.router_init is RouterInit.ZEROS
    assert spec.format is Format.NATIVE
    assert spec.mode is Mode.UPCYCLE


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(experts=1), "--experts must be at least 2"),
        (dict(experts=0), "--experts must be at least 2"),
        (dict(topk=0), "--topk must be between 1 and --experts"),
        (dict(experts=4, topk=5), r"--topk must be between 1 and --experts \(4\)"),
        (dict(granularity=0), "--granularity must be at least 1"),
        (dict(shared_experts=-1), "--shared-experts cannot be negative"),
        (dict(noise=-0.1), "--noise"),
        (dict(router_std=-1.0), "--router-std"),
        (dict(drop_ratio=1.0), r"--drop-ratio must be in \[0, 1\)"),
        (dict(drop_ratio=-0.1), "--drop-ratio"),
        (dict(max_shard_size="lots"), "cannot read size"),
        (dict(moe_layers="some"), "cannot read --moe-layers"),
        (dict(dtype="float8"), "unknown dtype 'float8'; choose one of auto|float32|bfloat16|float16"),
        (dict(router_init="ones"), "unknown router_init"),
    ],
)
def test_invalid_specs_are_refused_with_an_actionable_message(changes, message):
    with pytest.raises(MoeifyError, match=message):
        Spec(**changes)


def test_valid_edges():
    assert Spec(experts=2, topk=2).topk == 2
    assert Spec(experts=2, topk=1).topk == 1
    assert Spec(drop_ratio=0.99).drop_ratio == 0.99


def test_granularity_multiplies_experts_and_topk():
    spec = Spec(experts=2, topk=1, granularity=2)
    assert spec.routed_experts == 4
    assert spec.active_experts == 2
    spec = Spec(experts=8, topk=2, granularity=4)
    assert (spec.routed_experts, spec.active_experts) == (32, 8)


def test_dict_round_trip_through_json():
    spec = Spec(experts=4, topk=1, granularity=2, dtype="float16", router_init="zeros", router_std=0.5,
                noise=0.01, drop_ratio=0.25, seed=7, max_shard_size="200MB", moe_layers="all")
    data = json.loads(json.dumps(spec.to_dict()))  # plain JSON types only
    assert data["dtype"] == "float16" and data["router_init"] == "zeros" and data["mode"] == "upcycle"
    assert Spec.from_dict(data) == spec
    assert Spec.from_dict({}) == Spec()


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(MoeifyError, match="unknown conversion field.*expertz"):
        Spec.from_dict({"expertz": 4})


def test_from_dict_validates():
    with pytest.raises(MoeifyError, match="--experts"):
        Spec.from_dict({"experts": 1})


@pytest.mark.parametrize(
    "expr, layers",
    [
        ("all", [0, 1, 2, 3, 4, 5]),
        ("every:2", [1, 3, 5]),
        ("every:3", [2, 5]),
        ("skip-first:2", [2, 3, 4, 5]),
        ("0,2, 4", [0, 2, 4]),
        ("4,0,0", [0, 4]),
    ],
)
def test_parse_layers(expr, layers):
    assert parse_layers(expr, 6) == layers
    assert Spec(moe_layers=expr).layers(6) == layers


@pytest.mark.parametrize(
    "expr, message",
    [("7", "names layer 7, but the model has layers 0..5"), ("skip-first:6", "selects no layer"),
     ("every:0", "selects no layer"), ("x,y", "cannot read --moe-layers")],
)
def test_parse_layers_against_a_model(expr, message):
    with pytest.raises(MoeifyError, match=message):
        parse_layers(expr, 6)


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("1.5kb") == 1500
    assert parse_size("123") == 123
    for bad in ("", "GB", "-1GB", "0", "5 parsecs"):
        with pytest.raises(MoeifyError, match="cannot read size"):
            parse_size(bad)
