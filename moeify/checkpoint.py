"""Lazy reading and streaming writing of safetensors checkpoints.

A conversion never holds a model in memory: `Checkpoint` reads one tensor at a time,
and `write_shards` writes each output shard by computing its header from shapes first,
then streaming tensor bytes as they are produced.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import torch

from moeify.errors import MoeifyError
from moeify.validation import check_config

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
MAX_HEADER = 100_000_000  # bytes of JSON header, as the safetensors library caps it

# safetensors dtype codes, both ways.
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
CODES: dict[torch.dtype, str] = {dtype: code for code, dtype in DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes live in a safetensors file."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    path: Path
    offset: int  # absolute byte offset in the file
    nbytes: int


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and validate a safetensors header; reject truncated, corrupted or overlapping files."""
    header, data_start = _parse_header(path)
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        try:
            begin, stop = entry["data_offsets"]
            dtype, shape = DTYPES[entry["dtype"]], tuple(entry["shape"])
            if not all(type(n) is int and n >= 0 for n in (begin, stop, *shape)):
                raise ValueError  # offsets and sizes are non-negative integers; anything else is damage
        except (KeyError, TypeError, ValueError):
            raise MoeifyError(f"{path} has a corrupted entry for {name!r}; re-download it") from None
        if stop - begin != math.prod(shape) * dtype.itemsize:
            raise MoeifyError(f"{path} is corrupted: {name!r} has the wrong byte size; re-download it")
        infos[name] = TensorInfo(name, dtype, shape, path, data_start + begin, stop - begin)
    _check_ranges(path, infos, path.stat().st_size)
    return infos


def _parse_header(path: Path) -> tuple[dict, int]:
    """The header's JSON object (without __metadata__) and the offset where tensor data starts."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw_len = f.read(8)
        if len(raw_len) < 8:
            raise MoeifyError(f"{path} is not a safetensors file (too short); re-download it")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > MAX_HEADER:
            raise MoeifyError(f"{path} is corrupted: its header claims {header_len} bytes, over the "
                              f"{MAX_HEADER // 10**6} MB safetensors allows; re-download it")
        if header_len > size - 8:
            raise MoeifyError(f"{path} is truncated or corrupted (header runs past the end); re-download it")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):  # RecursionError: nested too deep
            raise MoeifyError(f"{path} has a corrupted header; re-download it") from None
    if not isinstance(header, dict):
        raise MoeifyError(f"{path} has a corrupted header; re-download it")
    header.pop("__metadata__", None)
    return header, 8 + header_len


def _check_ranges(path: Path, infos: dict[str, TensorInfo], size: int) -> None:
    """Tensor bytes lie inside the file and never share a byte (the safetensors library refuses overlaps)."""
    end, previous = 0, None
    occupied = (info for info in infos.values() if info.nbytes)  # an empty tensor takes no byte, wherever it points
    for info in sorted(occupied, key=lambda i: i.offset):
        if info.offset < end:
            raise MoeifyError(f"{path} is corrupted: the bytes of {info.name!r} overlap those of "
                              f"{previous.name!r}; re-download it")
        end, previous = info.offset + info.nbytes, info
    if end > size:
        raise MoeifyError(f"{path} is truncated ({size} bytes, the header promises {end}); re-download it")


class Checkpoint:
    """A folder of safetensors weights plus config.json, read one tensor at a time.

    Tensors are read with pread into fresh buffers rather than memory-mapped: pages of a
    mapping stay in the resident set after use, and peak memory must not grow with the model.
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.config = _read_config(self.folder)
        self.tensors: dict[str, TensorInfo] = _read_headers(_shard_files(self.folder))
        if not self.tensors:
            raise MoeifyError(f"{self.folder} holds no tensors; point at a folder with model weights")

    def names(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise MoeifyError(f"tensor {name!r} is missing from {self.folder}; the checkpoint is incomplete") from None

    def read(self, name: str) -> torch.Tensor:
        info = self.info(name)
        buffer = torch.empty(info.nbytes, dtype=torch.uint8)
        view, done = memoryview(buffer.numpy()), 0
        with open(info.path, "rb") as f:
            while done < info.nbytes:  # one pread returns at most ~2 GiB
                got = os.preadv(f.fileno(), [view[done:]], info.offset + done)
                if got == 0:
                    raise MoeifyError(f"{info.path} is truncated while reading {name!r}; re-download it")
                done += got
        return buffer.view(info.dtype).reshape(info.shape)

    def meta(self, name: str) -> torch.Tensor:
        """A tensor with the right shape and dtype but no data, for planning."""
        info = self.info(name)
        return torch.empty(info.shape, dtype=info.dtype, device="meta")


def _read_headers(shards: list[Path]) -> dict[str, TensorInfo]:
    tensors: dict[str, TensorInfo] = {}
    for shard in shards:
        for name, info in read_header(shard).items():
            if name in tensors:  # which copy would a loader take? Neither is safe to guess.
                raise MoeifyError(f"tensor {name!r} is in both {tensors[name].path.name} and {shard.name}; "
                                  f"re-download the model")
            tensors[name] = info
    return tensors


def _read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise MoeifyError(f"{folder} has no config.json; point at a Hugging Face model folder")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MoeifyError(f"{path} is not valid JSON ({e}); fix or re-download it") from None
    if not isinstance(config, dict):
        raise MoeifyError(f"{path} is not a JSON object; fix or re-download it")
    check_config(config)
    return config


def _shard_files(folder: Path) -> list[Path]:
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not all(isinstance(name, str) for name in weight_map.values()):
                raise TypeError
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
            raise MoeifyError(f"{index} is corrupted; re-download it") from None
        names = list(dict.fromkeys(weight_map.values()))
        for name in names:
            _check_shard_name(index, name)
        shards = [folder / name for name in names]
        for shard in shards:
            if not shard.is_file():
                raise MoeifyError(f"shard {shard.name} is named in {INDEX_FILE} but missing; re-download it")
        return shards
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        raise MoeifyError(f"{folder} has no safetensors weights; convert the checkpoint to safetensors first")
    return shards


def _check_shard_name(index: Path, name: str) -> None:
    """A shard is a file inside the model folder, named relative to it.

    The name is checked, not where it leads: in a Hugging Face cache snapshot every shard is a
    symlink into ../../blobs, and that is the cache's business, not the index's.
    """
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts:
        raise MoeifyError(f"{index} names shard {name!r}, outside the model folder; shards must sit "
                          f"inside it (re-download the model)")


# ---------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class PlannedTensor:
    """An output tensor known by shape before its bytes exist."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    produce: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """'5GB' -> 5_000_000_000, as transformers reads max_shard_size."""
    match = _SIZE.match(str(text))
    if not match or float(match.group(1)) <= 0:
        raise MoeifyError(f"cannot read size {text!r}; write it like 5GB, 500MB or 2GiB")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "B").upper()])


def plan_shards(tensors: Sequence[PlannedTensor], max_bytes: int) -> list[list[PlannedTensor]]:
    """Group tensors in order into shards of at most max_bytes (a larger tensor gets its own)."""
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for tensor in tensors:
        if shards[-1] and size + tensor.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    return shards


def write_shards(
    tensors: Sequence[PlannedTensor],
    folder: Path,
    max_shard_size: str,
    on_bytes: Callable[[int], None] = lambda n: None,
) -> list[str]:
    """Write tensors as safetensors shards (plus an index when there are several)."""
    shards = plan_shards(tensors, parse_size(max_shard_size))
    names = (
        [SINGLE_FILE]
        if len(shards) == 1
        else [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    )
    for name, shard in zip(names, shards):
        _write_shard(folder / name, shard, on_bytes)
    if len(shards) > 1:
        weight_map = {t.name: name for name, shard in zip(names, shards) for t in shard}
        total = sum(t.nbytes for t in tensors)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return names


def _header(shard: Sequence[PlannedTensor]) -> bytes:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in shard:
        header[t.name] = {"dtype": CODES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # tensor data starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


def _write_shard(path: Path, shard: Sequence[PlannedTensor], on_bytes: Callable[[int], None]) -> None:
    repeats = _Repeats()
    with open(path, "w+b", buffering=0) as f:  # readable too: copy_file_range reads from it
        _write_all(f, memoryview(_header(shard)))
        for planned in shard:
            tensor = planned.produce()
            assert tensor.shape == planned.shape and tensor.dtype == planned.dtype, planned.name
            offset = f.tell()
            if not repeats.copy(f, tensor, offset):
                _write_all(f, memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()))
                repeats.remember(tensor, offset)
            on_bytes(planned.nbytes)


def _write_all(f, view: memoryview) -> None:
    while view:  # a raw write may take fewer bytes than offered
        view = view[f.write(view):]


class _Repeats:
    """Recently written tensors; writing one again is an in-kernel copy from its first place in the file.

    Upcycled experts are the same tensor N times: copy_file_range (what cp uses) then moves
    those bytes without passing them through user space. The tensors are kept referenced, so
    their identity cannot be reused by a new tensor while they are remembered.
    """

    def __init__(self, size: int = 16):
        self._size, self._seen = size, {}

    def remember(self, tensor: torch.Tensor, offset: int) -> None:
        self._seen[id(tensor)] = (tensor, offset)
        if len(self._seen) > self._size:
            del self._seen[next(iter(self._seen))]

    def copy(self, f, tensor: torch.Tensor, offset: int) -> bool:
        seen = self._seen.get(id(tensor))
        if seen is None or seen[0] is not tensor or not hasattr(os, "copy_file_range"):
            return False
        start, source, todo = offset, seen[1], tensor.numel() * tensor.element_size()
        try:
            while todo:
                done = os.copy_file_range(f.fileno(), f.fileno(), todo, source, offset)
                if done == 0:
                    raise OSError("copy_file_range made no progress")
                source, offset, todo = source + done, offset + done, todo - done
        except OSError:  # unsupported here: rewind, and the caller writes the bytes instead
            f.seek(start)
            return False
        f.seek(offset)
        return True
