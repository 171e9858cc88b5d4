"""The streaming writer's output bytes: pinned, so a faster writer cannot change a single byte.

The source is a tiny llama whose weights are a fixed function of their position (no random
initialisation), and every conversion below uses a fixed seed; the sha256 of each weight file
was taken with the writer as it was before it was made faster (commit bbef1b9).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.fixtures import make_tiny, run_cli

CASES = [  # conversions covering clones, casts, shards, noise, fine experts, remote packing
    ("upcycle", "--experts", "4", "--topk", "2"),
    ("upcycle", "--experts", "3", "--topk", "1", "--dtype", "bfloat16", "--max-shard-size", "40KB"),
    ("upcycle", "--experts", "4", "--topk", "2", "--noise", "0.01", "--drop-ratio", "0.5", "--seed", "3"),
    ("upcycle", "--experts", "2", "--topk", "2", "--granularity", "4", "--shared-experts", "1",
     "--format", "remote"),
    ("upcycle", "--experts", "4", "--topk", "2", "--moe-layers", "every:2", "--format", "native",
     "--router-init", "zeros", "--max-shard-size", "60KB"),
]

# (source dtype, case number) -> weights_digest; regenerate only for a deliberate format change, never for speed.
PINNED: dict[tuple[str, int], str] = {
    ("float32", 0): "9849c1f37430829af0f3a3ea1249d56afa3182b3d4023e9f5f880b0a3000c602",
    ("float32", 1): "ebfcfb6ed6d83f478a6288a7351d81364a55c59f32d65862326737d2b5a3050c",
    ("float32", 2): "40e46c6d1cec775465f0a6e82fab590ab5c6262f2be54375e1de74148a7b3a73",
    ("float32", 3): "9381fec7cf04d2df060ef5510145dc54fcef742ac5544f668b3ae4234484dd92",
    ("float32", 4): "078066b056462848ecad14cf54bb833293922ad35402f1e4a129bb0d8446896c",
    ("bfloat16", 0): "f412601337f0ab8258e9a843be62df8374934f946518be41652215678a0b1a9e",
    ("bfloat16", 1): "ebfcfb6ed6d83f478a6288a7351d81364a55c59f32d65862326737d2b5a3050c",
    ("bfloat16", 2): "878e970dcb38438d55dbeb6d742b6d80853cefc7bd8521ed32dfbfa0e8540669",
    ("bfloat16", 3): "45711c3cbb441a9040ee9a7585d3f0f277d7e48ec653bc8d617c5238d28c36a8",
    ("bfloat16", 4): "d9a1ba05dfe74c1a00244011f04c626eeb8da8d7c0c41b7add2cb2d6fd81c733",
}


def fixed_llama(folder: Path, dtype: torch.dtype) -> Path:
    """A tiny llama whose every weight is sin of its position, scaled: the same bytes everywhere."""
    make_tiny("llama", folder)
    path = folder / "model.safetensors"
    tensors = load_file(path)
    fixed = {}
    for i, (name, t) in enumerate(sorted(tensors.items())):
        values = torch.sin(torch.arange(t.numel(), dtype=torch.float64) * 0.37 + i) * 0.05
        fixed[name] = (values + (1.0 if name.endswith("norm.weight") else 0.0)).reshape(t.shape).to(dtype)
    save_file(fixed, path, {"format": "pt"})
    return folder


def weights_digest(folder: Path) -> str:
    """One sha256 over every weight file's name and sha256, the index included."""
    files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.index.json"))
    lines = "".join(f"{f.name} {hashlib.sha256(f.read_bytes()).hexdigest()}\n" for f in files)
    return hashlib.sha256(lines.encode()).hexdigest()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("case", CASES, ids=lambda case: " ".join(case[1:]))
def test_output_bytes_are_pinned(tmp_path: Path, case: tuple[str, ...], dtype: torch.dtype):
    source = fixed_llama(tmp_path / "src", dtype)
    out = tmp_path / "out"
    assert run_cli(*case, source, "--output", out) == 0
    assert weights_digest(out) == PINNED[(str(dtype).removeprefix("torch."), CASES.index(case))]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # nothing staged left beside it
