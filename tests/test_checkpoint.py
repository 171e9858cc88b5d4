"""checkpoint.py: lazy reading of single-file and sharded folders, and the streaming shard writer."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from moeify.checkpoint import (
    INDEX_FILE, Checkpoint, PlannedTensor, read_header, write_shards,
)
from moeify.errors import MoeifyError


def planned(name: str, tensor: torch.Tensor) -> PlannedTensor:
    return PlannedTensor(name, tuple(tensor.shape), tensor.dtype, lambda: tensor)


def sample_tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "a.float32": torch.randn(7, 5, generator=gen),
        "b.bfloat16": torch.randn(3, 11, generator=gen).to(torch.bfloat16),
        "c.float16": torch.randn(13, generator=gen).to(torch.float16),
        "d.int64": torch.randint(-(2**40), 2**40, (3, 3), generator=gen),
        "e.scalar": torch.tensor(3.5),
        "f.empty": torch.empty(0, 4),
        "g.int8": torch.randint(-128, 127, (5,), dtype=torch.int8, generator=gen),
    }


def raw(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def header_len(path: Path) -> int:
    with open(path, "rb") as f:
        return struct.unpack("<Q", f.read(8))[0]


# ---------------------------------------------------------------------------- reading


def test_reads_single_file_folder(tiny_llama: Path):
    ckpt = Checkpoint(tiny_llama)
    expected = load_file(tiny_llama / "model.safetensors")
    assert ckpt.config["model_type"] == "llama"
    assert set(ckpt.names()) == set(expected)
    for name, tensor in expected.items():
        got = ckpt.read(name)
        assert got.dtype == tensor.dtype and got.shape == tensor.shape
        assert torch.equal(got, tensor), name
        meta = ckpt.meta(name)
        assert meta.is_meta and meta.shape == tensor.shape and meta.dtype == tensor.dtype
    assert "model.embed_tokens.weight" in ckpt and "nope" not in ckpt
    with pytest.raises(MoeifyError, match="missing"):
        ckpt.read("nope")


def sharded_folder(folder: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """A folder with config.json, two safetensors shards written by safetensors itself, and an index."""
    folder.mkdir(parents=True)
    names = sorted(tensors)
    first, second = names[: len(names) // 2], names[len(names) // 2 :]
    save_file({n: tensors[n] for n in first}, folder / "model-00001-of-00002.safetensors", {"format": "pt"})
    save_file({n: tensors[n] for n in second}, folder / "model-00002-of-00002.safetensors", {"format": "pt"})
    weight_map = {n: "model-00001-of-00002.safetensors" for n in first}
    weight_map |= {n: "model-00002-of-00002.safetensors" for n in second}
    (folder / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return folder


def test_reads_sharded_folder(tmp_path: Path):
    tensors = {k: v for k, v in sample_tensors().items()}
    folder = sharded_folder(tmp_path / "sharded", tensors)
    # A stray safetensors file not named in the index must be ignored.
    save_file({"stray": torch.zeros(2)}, folder / "stray.safetensors")
    ckpt = Checkpoint(folder)
    assert set(ckpt.names()) == set(tensors)
    for name, tensor in tensors.items():
        got = ckpt.read(name)
        assert got.dtype == tensor.dtype and got.shape == tensor.shape
        assert raw(got) == raw(tensor), name
    assert {ckpt.info(n).path.name for n in tensors} == {
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}


def test_missing_shard_named_in_index(tmp_path: Path):
    folder = sharded_folder(tmp_path / "sharded", sample_tensors())
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(MoeifyError, match="model-00002-of-00002.safetensors.*missing"):
        Checkpoint(folder)


@pytest.mark.parametrize("index", [
    "{not json", json.dumps({"metadata": {}}), json.dumps({"weight_map": ["a"]}),
    json.dumps({"weight_map": {"a": 5}}), json.dumps([1]),
])
def test_corrupted_index(tmp_path: Path, index: str):
    folder = sharded_folder(tmp_path / "sharded", sample_tensors())
    (folder / INDEX_FILE).write_text(index)
    with pytest.raises(MoeifyError, match="index.json is corrupted"):
        Checkpoint(folder)


def test_folder_without_config_or_weights(tmp_path: Path):
    (tmp_path / "a").mkdir()
    with pytest.raises(MoeifyError, match="config.json"):
        Checkpoint(tmp_path / "a")
    (tmp_path / "a" / "config.json").write_text("{}")
    with pytest.raises(MoeifyError, match="no safetensors"):
        Checkpoint(tmp_path / "a")
    (tmp_path / "a" / "config.json").write_text("{not json")
    with pytest.raises(MoeifyError, match="not valid JSON"):
        Checkpoint(tmp_path / "a")
    (tmp_path / "a" / "config.json").write_bytes(b"\xff\xfe{}")
    with pytest.raises(MoeifyError, match="not valid JSON"):
        Checkpoint(tmp_path / "a")
    (tmp_path / "a" / "config.json").write_text("[1, 2]")
    with pytest.raises(MoeifyError, match="not a JSON object"):
        Checkpoint(tmp_path / "a")


DEEP = "[" * 200_000 + "]" * 200_000  # json.loads raises RecursionError on it


def test_deeply_nested_config_or_index_is_one_line(tmp_path: Path):
    folder = sharded_folder(tmp_path / "sharded", sample_tensors())
    index = (folder / INDEX_FILE).read_text()
    (folder / INDEX_FILE).write_text(DEEP)
    with pytest.raises(MoeifyError, match="index.json is corrupted"):
        Checkpoint(folder)
    (folder / INDEX_FILE).write_text(index)
    (folder / "config.json").write_text(DEEP)
    with pytest.raises(MoeifyError, match="config.json is not valid JSON \\(nested too deeply\\)"):
        Checkpoint(folder)


@pytest.mark.parametrize("kind", ["folder", "pipe"])
def test_weights_that_are_not_a_file_are_refused(tmp_path: Path, kind: str):
    """A pipe named model.safetensors would block its reader forever."""
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    weights = folder / "model.safetensors"
    weights.mkdir() if kind == "folder" else os.mkfifo(weights)
    with pytest.raises(MoeifyError, match="model.safetensors is not a file"):
        Checkpoint(folder)


def one_tensor_folder(folder: Path, tensors: dict[str, torch.Tensor]) -> Checkpoint:
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    save_file(tensors, folder / "model.safetensors")
    return Checkpoint(folder)


def test_a_tensor_read_is_the_readers_own_copy(tmp_path: Path):
    """Reads map the file copy-on-write: writing into a tensor read changes neither the file nor a later read."""
    ckpt = one_tensor_folder(tmp_path / "m", {"w": torch.arange(12.0).reshape(3, 4)})
    first = ckpt.read("w")
    first.mul_(-1).add_(7)
    assert torch.equal(ckpt.read("w"), torch.arange(12.0).reshape(3, 4))
    assert torch.equal(load_file(tmp_path / "m" / "model.safetensors")["w"], torch.arange(12.0).reshape(3, 4))


def test_a_tensor_on_an_odd_offset_is_read_whole(tmp_path: Path):
    """The data of a float32 tensor may start at an odd byte in a file written by another tool: read it anyway."""
    small, b = torch.tensor([1, 2, 3], dtype=torch.int8), torch.randn(5, 3)
    header = json.dumps({"a": {"dtype": "I8", "shape": [3], "data_offsets": [0, 3]},
                         "b": {"dtype": "F32", "shape": [5, 3], "data_offsets": [3, 63]}}).encode()
    header += b" " * (-len(header) % 8)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    (tmp_path / "m" / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + raw(small) + raw(b))
    ckpt = Checkpoint(tmp_path / "m")
    assert ckpt.info("b").offset % 4 == 3
    assert torch.equal(ckpt.read("b"), b) and torch.equal(ckpt.read("a"), small)


def test_a_file_cut_short_after_opening_is_one_line_when_read(tmp_path: Path):
    ckpt = one_tensor_folder(tmp_path / "m", {"w": torch.randn(64, 64)})
    path = tmp_path / "m" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])  # another process truncates it (a re-download, a full disk)
    with pytest.raises(MoeifyError, match="truncated while reading 'w'"):
        ckpt.read("w")


def test_truncated_file_is_rejected(tmp_path: Path):
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.randn(64, 64)}, path)
    data = path.read_bytes()
    path.write_bytes(data[:-100])  # tensor bytes cut short
    with pytest.raises(MoeifyError, match="truncated"):
        read_header(path)
    path.write_bytes(data[:20])  # header cut short
    with pytest.raises(MoeifyError, match="truncated|corrupted"):
        read_header(path)
    path.write_bytes(data[:5])  # not even the length prefix
    with pytest.raises(MoeifyError, match="too short"):
        read_header(path)


def test_corrupted_header_is_rejected(tmp_path: Path):
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.randn(4, 4)}, path)
    data = bytearray(path.read_bytes())
    garbage = data.copy()
    garbage[8:24] = b"\xff" * 16
    path.write_bytes(bytes(garbage))
    with pytest.raises(MoeifyError, match="corrupted header"):
        read_header(path)
    # Valid JSON whose entry lies about the tensor's size, or names an unknown dtype.
    n = header_len(path)
    header, body = json.loads(bytes(data[8 : 8 + n])), bytes(data[8 + n :])

    def rewrite(h: dict) -> None:
        text = json.dumps(h).encode()
        path.write_bytes(struct.pack("<Q", len(text)) + text + body)

    rewrite(header)
    assert read_header(path)["w"].shape == (4, 4)  # the rewriting itself is sound
    header["w"]["shape"] = [4, 5]
    rewrite(header)
    with pytest.raises(MoeifyError, match="wrong byte size"):
        read_header(path)
    header["w"] = {"dtype": "NOPE", "shape": [4, 4], "data_offsets": [0, 64]}
    rewrite(header)
    with pytest.raises(MoeifyError, match="corrupted entry"):
        read_header(path)
    # Offsets or sizes of the wrong type or sign are damage too, not a crash further on.
    for damage in ({"data_offsets": ["0", "64"]}, {"shape": ["4", 4]}, {"shape": [-4, -4]},
                   {"data_offsets": [-64, 0]}, {"data_offsets": [0]}, {"shape": 16}):
        rewrite(header | {"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]} | damage})
        with pytest.raises(MoeifyError, match="corrupted entry"):
            read_header(path)
    rewrite([1, 2])
    with pytest.raises(MoeifyError, match="corrupted header"):
        read_header(path)

def with_header(path: Path, header: object, body: bytes) -> None:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + body)


def test_overlapping_byte_ranges_are_rejected(tmp_path: Path):
    """Two tensors sharing bytes: the safetensors library refuses such a file, and so does moeify."""
    path = tmp_path / "m.safetensors"
    save_file({"a": torch.randn(4, 4), "b": torch.randn(4, 4)}, path)
    n = header_len(path)
    data = path.read_bytes()
    header, body = json.loads(data[8 : 8 + n]), data[8 + n :]
    assert header["a"]["data_offsets"] == [0, 64] and header["b"]["data_offsets"] == [64, 128]
    header["b"]["data_offsets"] = [32, 96]  # the right size, half inside a's bytes
    with_header(path, header, body)
    with pytest.raises(MoeifyError, match="bytes of 'b' overlap those of 'a'"):
        read_header(path)
    header["b"]["data_offsets"] = [0, 64]  # the very same bytes
    with_header(path, header, body)
    with pytest.raises(MoeifyError, match="overlap"):
        read_header(path)
    # Empty tensors occupy no bytes: pointing anywhere, even inside another tensor, is no overlap.
    header["b"] = {"dtype": "F32", "shape": [0, 4], "data_offsets": [32, 32]}
    with_header(path, header, body)
    assert read_header(path)["b"].shape == (0, 4)


def test_deeply_nested_header_is_one_clear_error(tmp_path: Path):
    path = tmp_path / "m.safetensors"
    text = b'{"w": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"  # json.loads would raise RecursionError
    path.write_bytes(struct.pack("<Q", len(text)) + text)
    with pytest.raises(MoeifyError, match="corrupted header"):
        read_header(path)


def test_header_over_100_mb_is_refused_unread(tmp_path: Path):
    """A header length over safetensors' cap is refused before a byte of it is read (the file is sparse)."""
    path = tmp_path / "m.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", 100_000_001))
        f.truncate(8 + 100_000_001 + 64)
    with pytest.raises(MoeifyError, match=r"claims 100000001 bytes, over the 100 MB safetensors allows"):
        read_header(path)
    with open(path, "r+b") as f:  # absurd lengths too, whatever the file's size
        f.write(struct.pack("<Q", 2**63))
    with pytest.raises(MoeifyError, match="over the 100 MB"):
        read_header(path)


@pytest.mark.parametrize("outside", ["../x.safetensors", "ABSOLUTE", "sub/../../x.safetensors", "./../x.safetensors"])
def test_index_naming_a_shard_outside_the_folder_is_refused(tmp_path: Path, outside: str):
    folder = sharded_folder(tmp_path / "sharded", sample_tensors())
    stolen = tmp_path / "x.safetensors"  # exists and is valid: only its place is wrong
    (folder / "model-00002-of-00002.safetensors").rename(stolen)
    name = str(stolen) if outside == "ABSOLUTE" else outside
    index = json.loads((folder / INDEX_FILE).read_text())
    index["weight_map"] = {k: name if v.startswith("model-00002") else v for k, v in index["weight_map"].items()}
    (folder / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(MoeifyError, match=f"names shard '{name}', outside the model folder"):
        Checkpoint(folder)


def test_hub_cache_snapshot_of_symlinks_is_read(tmp_path: Path):
    """A Hugging Face cache snapshot: every file is a symlink to ../../blobs/<hash>, which must keep working."""
    tensors = sample_tensors()
    plain = sharded_folder(tmp_path / "plain", tensors)
    blobs, snapshot = tmp_path / "hub" / "blobs", tmp_path / "hub" / "snapshots" / "abc123"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, file in enumerate(sorted(plain.iterdir())):
        (blobs / f"blob{i}").write_bytes(file.read_bytes())
        (snapshot / file.name).symlink_to(f"../../blobs/blob{i}")
    ckpt = Checkpoint(snapshot)
    assert set(ckpt.names()) == set(tensors)
    assert all(raw(ckpt.read(name)) == raw(tensor) for name, tensor in tensors.items())


def test_tensor_in_two_shards_is_refused(tmp_path: Path):
    tensors = sample_tensors()
    folder = sharded_folder(tmp_path / "sharded", tensors)
    first = load_file(folder / "model-00001-of-00002.safetensors")
    save_file(first | {"g.int8": torch.zeros(5, dtype=torch.int8)}, folder / "model-00001-of-00002.safetensors")
    with pytest.raises(MoeifyError, match="'g.int8' is in both model-00001-of-00002.safetensors and "
                                          "model-00002-of-00002.safetensors"):
        Checkpoint(folder)


@pytest.mark.parametrize("change, needle", [
    ({"num_hidden_layers": 10**9}, "num_hidden_layers must be an integer from 1 to 1024"),
    ({"hidden_size": "64"}, "hidden_size must be an integer"),
    ({"model_type": ["llama"]}, "model_type must be a name"),
    ({"dtype": "float8"}, "dtype must name a torch floating-point dtype"),
])
def test_config_is_checked_when_read(tiny_llama: Path, change: dict, needle: str):
    config = json.loads((tiny_llama / "config.json").read_text())
    (tiny_llama / "config.json").write_text(json.dumps(config | change))
    with pytest.raises(MoeifyError, match=needle):
        Checkpoint(tiny_llama)


# ---------------------------------------------------------------------------- writing


def test_write_shards_round_trips_every_dtype_byte_exactly(tmp_path: Path):
    tensors = sample_tensors()
    written = []
    names = write_shards([planned(k, v) for k, v in tensors.items()], tmp_path, "5GB", written.append)
    assert names == ["model.safetensors"]
    assert not (tmp_path / INDEX_FILE).exists()
    assert sum(written) == sum(t.numel() * t.element_size() for t in tensors.values())
    with safe_open(tmp_path / "model.safetensors", framework="pt") as f:
        assert list(f.keys()) == sorted(tensors)  # safe_open lists keys sorted
        assert f.metadata() == {"format": "pt"}
        for name, tensor in tensors.items():
            got = f.get_tensor(name)
            assert got.dtype == tensor.dtype and got.shape == tensor.shape, name
            assert raw(got) == raw(tensor), name
    # And moeify's own reader agrees, header alignment included.
    assert header_len(tmp_path / "model.safetensors") % 8 == 0
    infos = read_header(tmp_path / "model.safetensors")
    assert infos["a.float32"].offset % 8 == 0  # the first tensor's data starts 8-byte aligned
    assert [infos[n].offset for n in tensors] == sorted(infos[n].offset for n in tensors)  # written in order


def test_write_shards_respects_max_shard_size_and_writes_index(tmp_path: Path):
    gen = torch.Generator().manual_seed(1)
    tensors = {f"t{i:02d}": torch.randn(10 + i, 25, generator=gen) for i in range(12)}  # 1000..2100 bytes each
    tensors["big"] = torch.randn(1000, generator=gen)  # 4000 bytes: larger than a shard, gets its own
    tensors["z.bf16"] = torch.randn(300, generator=gen).to(torch.bfloat16)
    max_bytes = 3500
    names = write_shards([planned(k, v) for k, v in tensors.items()], tmp_path, f"{max_bytes}B")
    assert len(names) > 2
    assert names == [f"model-{i:05d}-of-{len(names):05d}.safetensors" for i in range(1, len(names) + 1)]
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert set(index["weight_map"]) == set(tensors)
    assert set(index["weight_map"].values()) == set(names)
    seen = {}
    for name in names:
        path = tmp_path / name
        assert header_len(path) % 8 == 0
        with safe_open(path, framework="pt") as f:
            keys = list(f.keys())
            size = 0
            for key in keys:
                got = f.get_tensor(key)
                assert raw(got) == raw(tensors[key]) and got.dtype == tensors[key].dtype
                assert index["weight_map"][key] == name
                size += got.numel() * got.element_size()
                seen[key] = name
        assert size <= max_bytes or len(keys) == 1, (name, size)
    assert set(seen) == set(tensors)
    assert len([n for n in names if seen["big"] == n]) == 1
    # The sharded output is a valid checkpoint folder for moeify's own reader.
    (tmp_path / "config.json").write_text("{}")
    ckpt = Checkpoint(tmp_path)
    assert all(raw(ckpt.read(k)) == raw(v) for k, v in tensors.items())


def test_write_shards_streams_one_tensor_at_a_time(tmp_path: Path):
    """Each tensor is produced only when the writer reaches it, after the header is on disk."""
    produced = []
    path = tmp_path / "model.safetensors"

    def producer(name: str, tensor: torch.Tensor):
        def produce():
            produced.append(name)
            # The header is already written: its length prefix is on disk before any tensor exists.
            assert path.exists()
            return tensor
        return produce

    tensors = sample_tensors()
    plan = [PlannedTensor(k, tuple(v.shape), v.dtype, producer(k, v)) for k, v in tensors.items()]
    write_shards(plan, tmp_path, "5GB")
    assert produced == list(tensors)


def test_repeated_tensors_are_written_byte_exactly(tmp_path: Path):
    """Upcycled experts are one tensor planned many times; every copy must hold the same bytes."""
    gen = torch.Generator().manual_seed(2)
    expert = torch.randn(33, 17, generator=gen)
    transposed = torch.randn(17, 33, generator=gen).T  # not contiguous
    half = torch.randn(5, 7, generator=gen).to(torch.bfloat16)
    plan, expected = [], {}
    for j in range(40):  # more repeats than the writer remembers, interleaved with other tensors
        for name, tensor in ((f"e{j}.w", expert), (f"e{j}.t", transposed), (f"e{j}.h", half)):
            plan.append(planned(name, tensor))
            expected[name] = tensor
        if j % 7 == 0:
            fresh = torch.randn(3, generator=gen)
            plan.append(planned(f"fresh{j}", fresh))
            expected[f"fresh{j}"] = fresh
    for size in ("5GB", "20KB"):  # one shard, and repeats spread over several shards
        folder = tmp_path / size
        folder.mkdir()
        names = write_shards(plan, folder, size)
        assert (len(names) == 1) is (size == "5GB")
        got = {}
        for name in names:
            with safe_open(folder / name, framework="pt") as f:
                got |= {k: f.get_tensor(k) for k in f.keys()}
        assert set(got) == set(expected)
        for name, tensor in expected.items():
            assert got[name].dtype == tensor.dtype and raw(got[name]) == raw(tensor), (size, name)


def test_config_without_layer_count_is_one_clear_error(tiny_llama: Path):
    from moeify.adapters import adapter_for

    config = json.loads((tiny_llama / "config.json").read_text())
    del config["num_hidden_layers"]
    with pytest.raises(MoeifyError, match="num_hidden_layers"):
        adapter_for(config).num_layers(config)
