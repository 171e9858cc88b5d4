"""Lazy reading and streaming writing of safetensors checkpoints.

A conversion never holds a model in memory: `Checkpoint` reads one tensor at a time,
and `write_shards` writes each output shard by computing its header from shapes first,
then streaming tensor bytes as they are produced.
"""

from __future__ import annotations

import errno
import json
import math
import mmap
import os
import struct
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Self

import torch

from moeify.errors import MoeifyError
from moeify.spec import parse_size
from moeify.validation import check_config

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
MAX_HEADER = 100_000_000  # bytes of JSON header, as the safetensors library caps it
CHUNK = 64 * 2**20  # bytes per write of the shard writer: large sequential writes
BLOCK = 4096  # O_DIRECT's alignment of buffers, offsets and lengths (the largest logical block in use)
DIRECT = hasattr(os, "O_DIRECT")  # Linux and most BSDs; macOS has no O_DIRECT, only F_NOCACHE
MADV_WILLNEED = getattr(mmap, "MADV_WILLNEED", None)  # POSIX madvise advice; absent on Windows
UNTRACKED = {"trackfd": False} if sys.version_info >= (3, 13) else {}  # before 3.13 a map keeps a descriptor

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

    Each tensor read is a copy-on-write map of its own bytes, unmapped when the tensor is freed:
    its pages are the page cache's, so reading costs no copy and no zeroed buffer (a pread into a
    fresh buffer took 4x the time here, mostly in the kernel), and it is charged to memory for its
    own size, as the buffer was. Never one long-lived map of a whole file: the pages a mapping
    touched stay in the resident set while it lasts, and peak memory must not grow with the model.
    As with safetensors' own loader, a file cut short, or a disk or network filesystem failing,
    while a mapped tensor is in use kills the process (SIGBUS); a file found short when a tensor
    is read is refused in one line. Before Python 3.13 each live map holds a file descriptor; when
    none is left, reads fall back to pread.
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
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        if info.offset % info.dtype.itemsize:
            return _pread(info)  # a view of mapped bytes needs them aligned to the dtype
        start = info.offset - info.offset % mmap.ALLOCATIONGRANULARITY
        with open(info.path, "rb") as f:
            if os.fstat(f.fileno()).st_size < info.offset + info.nbytes:
                raise _truncated(info)
            try:
                mapped = mmap.mmap(f.fileno(), info.offset + info.nbytes - start, access=mmap.ACCESS_COPY,
                                   offset=start, **UNTRACKED)
            except OSError:  # a filesystem that cannot map files, or no descriptor left for the map
                return _pread(info)
        if MADV_WILLNEED is not None:
            mapped.madvise(MADV_WILLNEED)  # the whole range is read next: ask for it in one go
        flat = torch.frombuffer(mapped, dtype=torch.uint8, offset=info.offset - start, count=info.nbytes)
        return flat.view(info.dtype).reshape(info.shape)  # the tensor holds the map; freed, it unmaps

    def meta(self, name: str) -> torch.Tensor:
        """A tensor with the right shape and dtype but no data, for planning."""
        info = self.info(name)
        return torch.empty(info.shape, dtype=info.dtype, device="meta")


def _pread(info: TensorInfo) -> torch.Tensor:
    """The tensor's bytes read into a fresh buffer."""
    buffer = torch.empty(info.nbytes, dtype=torch.uint8)
    view, done = memoryview(buffer.numpy()), 0
    with open(info.path, "rb") as f:
        while done < info.nbytes:  # one pread returns at most ~2 GiB
            got = os.preadv(f.fileno(), [view[done:]], info.offset + done)
            if got == 0:
                raise _truncated(info)
            done += got
    return buffer.view(info.dtype).reshape(info.shape)


def _truncated(info: TensorInfo) -> MoeifyError:
    """A file that became shorter than its header says, found while one of its tensors is read."""
    return MoeifyError(f"{info.path} is truncated while reading {info.name!r}; re-download it")


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
    config = read_json_object(path, "fix or re-download it")
    check_config(config)
    return config


def read_json_object(path: Path, fix: str) -> dict:
    """A JSON file holding one object; one line naming the file and `fix` (what to do) otherwise."""
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        why = "nested too deeply" if isinstance(e, RecursionError) else e
        raise MoeifyError(f"{path} is not valid JSON ({why}); {fix}") from None
    if not isinstance(value, dict):
        raise MoeifyError(f"{path} is not a JSON object; {fix}")
    return value


def _shard_files(folder: Path) -> list[Path]:
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not all(isinstance(name, str) for name in weight_map.values()):
                raise TypeError
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError, RecursionError):
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
    for shard in shards:
        if not shard.is_file():  # opening a pipe would wait for a writer forever
            raise MoeifyError(f"{shard} is not a file (a folder, pipe or device); remove it or re-download the model")
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
    with _Sink(path) as sink:  # the file exists before any tensor is produced
        sink.put(torch.frombuffer(bytearray(_header(shard)), dtype=torch.uint8))
        for planned in shard:
            tensor = planned.produce()
            assert tensor.shape == planned.shape and tensor.dtype == planned.dtype, planned.name
            sink.put(tensor.contiguous().reshape(-1).view(torch.uint8))
            on_bytes(planned.nbytes)


class _Sink:
    """One file written in large aligned chunks from two buffers: one fills while a thread writes the other.

    Where the filesystem allows it the file is opened with O_DIRECT, so the bytes go from the
    buffers to the disk without the page cache: a conversion writes many times the memory of the
    machine, and buffered writes of that much were throttled to a third of the speed of `cp`
    (dirty-page limits and reclaim), besides evicting everyone else's cache. O_DIRECT needs the
    buffer address, file offset and length aligned to the disk's block: the buffers are page-aligned
    anonymous maps, every write but the last is a whole chunk, and the last is padded to a block
    and the file then cut back to its size. Upcycled experts are one tensor many times: its bytes
    are copied into the buffers once per copy, which costs less than the kernel's in-file copy.
    The copies are torch's, which let go of the GIL: a tensor read is mapped, so a copy may wait
    for the disk, and a merge learns its gates on another thread meanwhile.
    """

    def __init__(self, path: Path):
        self._chunk = CHUNK
        assert self._chunk % BLOCK == 0, self._chunk
        self._buffers = [mmap.mmap(-1, self._chunk) for _ in range(2)]  # page-aligned, as O_DIRECT wants
        self._filled = [torch.frombuffer(buffer, dtype=torch.uint8) for buffer in self._buffers]
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="moeify-writer")
        self._path, self._pending, self._used, self._offset, self._current = path, None, 0, 0, 0
        self._fd, self._direct = _open_for_writing(path)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        try:
            if kind is None:
                self._close()
        finally:
            try:
                self._wait()  # never leave a write running on a descriptor about to close
            finally:
                self._pool.shutdown()
                os.close(self._fd)
                self._filled.clear()  # torch keeps no export of a buffer: its views must go before the unmap
                for buffer in self._buffers:
                    with suppress(BufferError):  # a view still held by an error's traceback: freed with it
                        buffer.close()

    def put(self, data: torch.Tensor) -> None:
        """Append the bytes of a flat uint8 tensor."""
        while len(data):
            take = min(len(data), self._chunk - self._used)
            self._filled[self._current][self._used:self._used + take].copy_(data[:take])
            self._used, data = self._used + take, data[take:]
            if self._used == self._chunk:
                self._flush(self._chunk)

    def _close(self) -> None:
        size, tail = self._offset + self._used, self._used
        padded = -(-tail // BLOCK) * BLOCK
        self._filled[self._current][tail:padded] = 0
        self._flush(padded)
        self._wait()
        os.ftruncate(self._fd, size)  # the padding of the last block goes again

    def _flush(self, length: int) -> None:
        self._wait()
        buffer = memoryview(self._buffers[self._current])[:length]
        self._pending = self._pool.submit(self._write, buffer, self._offset)
        self._offset, self._used, self._current = self._offset + length, 0, 1 - self._current

    def _wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def _write(self, view: memoryview, offset: int) -> None:
        while view:  # a write may take fewer bytes than offered
            try:
                done = os.pwrite(self._fd, view, offset)
            except OSError as e:
                if e.errno != errno.EINVAL or not self._direct:
                    raise
                self._buffered()  # the filesystem took O_DIRECT at open but refuses its writes
                continue
            view, offset = view[done:], offset + done

    def _buffered(self) -> None:
        fd = os.open(self._path, os.O_WRONLY | os.O_CLOEXEC)
        os.dup2(fd, self._fd)  # the same descriptor number, now through the page cache
        os.close(fd)
        self._direct = False


def _open_for_writing(path: Path) -> tuple[int, bool]:
    """A new file's descriptor, with O_DIRECT where the platform and filesystem have it (tmpfs has not)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
    if DIRECT:
        try:
            return os.open(path, flags | os.O_DIRECT, 0o644), True
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
    return os.open(path, flags, 0o644), False
