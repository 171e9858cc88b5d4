"""The single streaming pass: source checkpoint -> transform per layer -> target names -> shards.

Nothing here holds the model: the plan lists every output tensor by shape (learnt by running
the transform on meta tensors), and each tensor's bytes are produced only when the writer
reaches it. One layer's MoE is kept while its tensors are written, then dropped.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moeify import __version__, card, engines
from moeify import source as sources
from moeify.adapters import Adapter, adapter_for
from moeify.checkpoint import Checkpoint, PlannedTensor, write_shards
from moeify.output import staged_output
from moeify.spec import DType, Spec
from moeify.targets import choose
from moeify.targets.base import Target, dtype_name
from moeify.transforms import FFN, MoELayer, upcycle
from moeify.validation import check_weights

# Files of the source folder that describe weights or the model itself: never copied verbatim.
NOT_COPIED_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".gguf", ".py", ".ckpt")
NOT_COPIED = {"config.json", "model.safetensors.index.json", "README.md", "moeify.json", ".gitattributes"}

Transform = Callable[[FFN, Spec, int], MoELayer]


@dataclass
class Result:
    """What a conversion produced, for the summary table, the card and moeify.json."""

    output: Path
    source: str
    spec: Spec
    target: str
    reason: str
    num_layers: int
    moe_layers: list[int]
    total_params: int
    active_params: int
    total_bytes: int
    files: list[str] = field(default_factory=list)
    engines: list[engines.Verdict] = field(default_factory=list)  # which engines compute it exactly
    resolved: dict = field(default_factory=dict)  # what the source resolved to: source.provenance
    changes: list[str] = field(default_factory=list)  # why the output computes other than the source; []: exact
    narrowed: str = ""  # "bfloat16 -> float16" when --dtype rounds the source's weights


class _LayerCache:
    """Builds one layer's MoE on first use and keeps only the latest layer."""

    def __init__(self, build: Callable[[int], MoELayer]):
        self._build, self._layer, self._moe = build, -1, None

    def get(self, layer: int) -> MoELayer:
        if layer != self._layer:
            self._moe = None  # free the previous layer before building the next
            self._moe, self._layer = self._build(layer), layer
        return self._moe


@dataclass
class _Job:
    ckpt: Checkpoint
    adapter: Adapter
    target: Target
    spec: Spec
    moe_layers: list[int]
    transform: Transform
    dtype: torch.dtype | None  # None keeps each tensor's own dtype
    routers: Callable[[int], torch.Tensor] | None = None  # layer -> router, written last (see plan)

    def cast(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.dtype) if self.dtype is not None and t.is_floating_point() else t

    def moe(self, layer: int, meta: bool = False) -> MoELayer:
        ffn = self.adapter.read_ffn(self.ckpt, layer, meta=meta).map(lambda role, t: self.cast(t))
        return self.target.adjusted(self.transform(ffn, self.spec, layer))


# Tensors a checkpoint holds that are not parameters: BatchNorm's statistics (PEER's query norm).
BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def plan(job: _Job) -> tuple[list[PlannedTensor], int]:
    """Every output tensor in writing order, and the parameters a token does not use.

    With job.routers (a merge's routers, learnt alongside the writing), every MoE layer's router
    comes after all other tensors, from job.routers(layer) (not the transform's stand-in): the
    writer never waits for a router while it has experts to write.
    """
    replaced = {name: layer for layer in job.moe_layers for name in job.adapter.ffn_names(layer).values()}
    cache = _LayerCache(job.moe)
    planned: list[PlannedTensor] = []
    routers: list[PlannedTensor] = []
    inactive = 0
    for name in sorted(job.ckpt.names(), key=_running_order):
        layer = replaced.get(name)
        if layer is None:
            meta = job.cast(job.ckpt.meta(name))
            planned.append(PlannedTensor(job.target.rename(name), tuple(meta.shape), meta.dtype,
                                         lambda name=name: job.cast(job.ckpt.read(name))))
            continue
        if name != next(iter(job.adapter.ffn_names(layer).values())):
            continue  # the layer's MoE tensors are planned once, at its first FFN tensor
        skeleton = job.moe(layer, meta=True)
        for out_name, take in job.target.moe_tensors(job.adapter, layer, skeleton):
            t = take(skeleton)
            if job.routers is not None and t is skeleton.router:
                routers.append(PlannedTensor(out_name, tuple(t.shape), t.dtype,
                                             lambda layer=layer, t=t: job.routers(layer).to(t.dtype)))
                continue
            planned.append(PlannedTensor(out_name, tuple(t.shape), t.dtype,
                                         lambda layer=layer, take=take: take(cache.get(layer))))
        inactive += skeleton.inactive_params  # a PeerLayer counts its own (no import of peer here)
    for out_name, source_name, derive in job.target.added_tensors(job.ckpt.names()):
        meta = derive(job.cast(job.ckpt.meta(source_name)))
        planned.append(PlannedTensor(out_name, tuple(meta.shape), meta.dtype,
                                     lambda name=source_name, derive=derive: derive(job.cast(job.ckpt.read(name)))))
    return planned + routers, inactive


def _running_order(name: str) -> list[tuple[bool, int, str]]:
    """Tensor names with their numbers compared as numbers: model.layers.9 before model.layers.10,
    where a checkpoint's header sorts them as text. A merge's writer then reaches the routers in
    the order its gates are learnt, instead of waiting for layer 10's after layer 1's."""
    return [(not part.isdecimal(), int(part) if part.isdecimal() else 0, part) for part in name.split(".")]


def _source_dtype(ckpt: Checkpoint) -> torch.dtype:
    name = ckpt.config.get("dtype") or ckpt.config.get("torch_dtype")
    if isinstance(name, str) and isinstance(getattr(torch, name, None), torch.dtype):
        return getattr(torch, name)
    floats = [i.dtype for i in ckpt.tensors.values() if i.dtype.is_floating_point]
    return max(set(floats), key=floats.count) if floats else torch.float32


def convert(source_dir: Path, output: Path, spec: Spec, *, source: str, transform: Transform = upcycle,
            adapter: Adapter | None = None, notes: Callable[[], dict] = dict,
            routers: Callable[[int], torch.Tensor] | None = None,
            overwrite: bool = False, on_plan: Callable[[int], None] = lambda total: None,
            on_bytes: Callable[[int], None] = lambda n: None) -> Result:
    """Convert the checkpoint in source_dir into a MoE checkpoint at output.

    adapter: the reader of each layer's FFN (default: the source family's own); a MoESource keeps the
    source's format and config. notes: more keys for moeify.json, asked for once the shards are
    written (a merge's routing report is learnt alongside the writing). routers: layer -> its
    router, (E, H), when the transform's is a stand-in (learnt alongside the writing): written last.
    """
    ckpt = Checkpoint(source_dir)
    if adapter is None:  # split passes its own reader for MoE sources
        adapter = adapter_for(ckpt.config)
        ckpt = adapter.loaded(ckpt)  # legacy tensor names as the family's model loads them
    check_weights(ckpt, adapter)  # the weights are the model config.json describes, before anything is planned
    moe_layers = spec.layers(adapter.num_layers(ckpt.config))
    target, reason = choose(adapter, ckpt.config, spec, moe_layers)
    dtype = None if spec.dtype is DType.AUTO else getattr(torch, spec.dtype.value)
    job = _Job(ckpt, adapter, target, spec, moe_layers, transform, dtype, routers)
    planned, inactive = plan(job)
    total_bytes = sum(p.nbytes for p in planned)
    on_plan(total_bytes)
    skeleton = job.moe(moe_layers[0], meta=True)  # shapes of the MoE layers, for the config
    out_dtype = dtype or _source_dtype(ckpt)
    if adapter.moe:  # a MoE source (split, expand) keeps its own format and config, rescaled
        config = adapter.output_config(ckpt.config, skeleton, dtype_name(out_dtype))
    else:
        config = target.config(adapter, ckpt.config, spec, moe_layers, skeleton, out_dtype)
    verdicts = engines.verdicts(config.to_dict(), spec)
    engines.require(spec.engine, verdicts)  # before anything is written
    total_params = sum(math.prod(p.shape) for p in planned if not p.name.endswith(BUFFERS))
    result = Result(output=Path(output), source=source, spec=spec, target=target.name, reason=reason,
                    num_layers=adapter.num_layers(ckpt.config), moe_layers=moe_layers,
                    total_params=total_params, active_params=total_params - inactive, total_bytes=total_bytes,
                    engines=verdicts)
    result.narrowed = narrowing(_source_dtype(ckpt), out_dtype)
    result.changes = changes(spec, result.narrowed)
    # The source's sha256 (seconds per GB) is taken while the shards are written: hashing and
    # writing wait on different things, and the writer's bytes go to disk in its own thread too.
    with staged_output(output, overwrite, protect=[source_dir], needs=total_bytes) as staging, \
            ThreadPoolExecutor(1) as pool:
        resolved = pool.submit(sources.provenance, source_dir)
        result.files = write_shards(planned, staging, spec.max_shard_size, on_bytes)
        result.resolved = resolved.result()
        config.save_pretrained(staging)
        target.write_code(staging)
        _copy_side_files(ckpt.folder, staging)
        card.write(staging, result, ckpt.config, ckpt.folder)
        (staging / "moeify.json").write_text(json.dumps(record(result) | notes(), indent=2) + "\n")
    return result


def narrowing(source: torch.dtype, output: torch.dtype) -> str:
    """'bfloat16 -> float16' when some source value has no equal in the output dtype (precision or range), else ''."""
    if source == output or not (source.is_floating_point and output.is_floating_point):
        return ""
    wide, narrow = torch.finfo(output), torch.finfo(source)
    if wide.eps <= narrow.eps and wide.max >= narrow.max and wide.smallest_normal <= narrow.smallest_normal:
        return ""  # a widening (bfloat16 or float16 -> float32) changes no value
    return f"{dtype_name(source)} -> {dtype_name(output)}"


def changes(spec: Spec, narrowed: str) -> list[str]:
    """What makes the output compute something other than the source: the summary says it instead of 'exact'."""
    found = []
    if spec.noise:
        found.append(f"--noise {spec.noise:g} perturbs every expert copy")
    if spec.drop_ratio:
        found.append(f"--drop-ratio {spec.drop_ratio:g} re-initialises {spec.drop_ratio:.0%} of each expert's neurons")
    if narrowed:
        found.append(f"--dtype rounds the weights ({narrowed})")
    return found


def record(result: Result) -> dict:
    """moeify.json: the spec (a valid recipe by itself) plus where it came from."""
    return result.spec.to_dict() | {
        "source": sources.public_name(result.source, result.resolved),  # never an absolute path
        "resolved": result.resolved,
        "moeify_version": __version__,
        "target": result.target,
        "moe_layer_indices": result.moe_layers,
        "total_params": result.total_params,
        "active_params": result.active_params,
        "engines": {v.engine.value: v.to_dict() for v in result.engines},
    }


def _copy_side_files(source: Path, dest: Path) -> None:
    """Tokenizer, chat template, generation config and the like go with the model."""
    for path in sorted(source.iterdir()):
        if path.is_file() and not path.name.startswith(".") and path.name not in NOT_COPIED \
                and not path.name.endswith(NOT_COPIED_SUFFIXES):
            shutil.copy2(path, dest / path.name)
