"""Loading a checkpoint as a transformers model or tokenizer: the one place that decides whose code runs.

A folder may ship Python of its own (named by `auto_map` in config.json or tokenizer_config.json);
transformers imports it with trust_remote_code=True. moeify passes that only when the user did
(--trust-remote-code). moeify's own remote outputs need no consent: their code is checked to be a
version moeify shipped (moeify.trust) and moeify's own copy of those classes builds the model.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path

import torch
from torch import nn

from moeify import trust
from moeify.checkpoint import _read_config
from moeify.errors import MoeifyError

TOKENIZER_CONFIG = "tokenizer_config.json"


class Code(Enum):
    """Whose Python builds a folder's model."""

    FAMILY = "family"  # transformers' own classes for the model_type; any auto_map is ignored
    MOEIFY = "moeify"  # moeify's remote code, verified: the classes in moeify's package, not the folder's files
    FOLDER = "folder"  # the folder's own modules: only with the user's --trust-remote-code


def code_of(folder: Path, trust_remote_code: bool = False) -> Code:
    """Whose code loads the folder; refused in one line when that would be the folder's without consent."""
    folder = Path(folder)
    auto_map = _read_config(folder).get("auto_map")
    if not auto_map:
        return Code.FAMILY
    if trust.is_moeify_code(folder, auto_map):
        return Code.MOEIFY
    if trust_remote_code:
        return Code.FOLDER
    raise MoeifyError(_refusal(folder, auto_map))


def _refusal(folder: Path, auto_map: object) -> str:
    files = ", ".join(trust.code_files(auto_map)) or "modules it names"
    refs = set(trust.code_refs(auto_map))
    if refs and refs <= set(trust.MOEIFY_AUTO_MAP.values()):
        return (f"{folder} carries moeify's remote code ({files}) but not a version moeify shipped, so loading "
                f"it would run someone else's Python; read it, then pass --trust-remote-code to run it")
    return (f"{folder} ships its own Python ({files}, named by config.json's auto_map), which loading it would "
            f"run; read it, then pass --trust-remote-code to run it")


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """No loading bars, reports or warnings from transformers while the block runs: moeify says in
    one line what matters to the user (a missing weight, a refusal) and has its own progress."""
    from transformers.utils import logging as hf_logging

    bars, level = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def load_model(folder: Path, code: Code | None = None) -> nn.Module:
    """A float32 causal LM in eval mode, built by `code` (None: code_of(folder), without the user's consent)."""
    folder = Path(folder)
    code = code_of(folder) if code is None else code
    if code is Code.MOEIFY:
        # moeify's own class: the folder's copy of the code is never imported, only compared (moeify.trust).
        from moeify.targets.remote_code.modeling_moeify import MoeifyForCausalLM as cls
        options = {}
    else:
        from transformers import AutoModelForCausalLM as cls
        options = {"trust_remote_code": code is Code.FOLDER}
    try:
        with quiet_transformers():
            model, info = cls.from_pretrained(folder, dtype=torch.float32, output_loading_info=True, **options)
    except Exception as e:  # includes the remote config's ValueErrors (a bad moe field, a non-FFN mlp_path)
        if "ignore_mismatched_sizes" in str(e):  # its report, which it points to, is quietened above
            raise MoeifyError(f"cannot load {folder} as a causal LM: some weights' shapes differ from what its "
                              f"config.json describes; fix the config or re-download the model") from None
        raise MoeifyError(f"cannot load {folder} as a causal LM ({type(e).__name__}: {_one_line(e)})") from None
    missing = sorted(info.get("missing_keys") or [])
    if missing:  # transformers would run with random weights there: the comparison would be meaningless
        raise MoeifyError(f"{folder} lacks {len(missing)} weight(s) its config needs (e.g. {missing[0]}); "
                          f"the checkpoint is incomplete or mis-named")
    return model.eval()


def tokenizer_in(folder: Path, code: Code | None = None):
    """The tokenizer saved in a folder, or None when it has none; its own code runs only when code is FOLDER."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    code = code_of(folder) if code is None else code
    # AutoTokenizer reads config.json for the model type: give it the family's config, which
    # needs no code, instead of letting it try (and warn about) the moeify one.
    options = {"config": _moeify_config(folder).base_config} if code is Code.MOEIFY else {}
    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=code is Code.FOLDER, **options)
    except Exception:  # no or unreadable tokenizer files, or a tokenizer that is only its own code
        files = trust.code_files(_tokenizer_auto_map(folder))
        if files and code is not Code.FOLDER:
            raise MoeifyError(f"{folder}'s tokenizer is its own Python ({', '.join(files)}, named by "
                              f"{TOKENIZER_CONFIG}'s auto_map), which moeify runs only with --trust-remote-code"
                              ) from None
        return None


def _moeify_config(folder: Path):
    from moeify.targets.remote_code.configuration_moeify import MoeifyConfig

    try:
        return MoeifyConfig.from_pretrained(folder)
    except Exception as e:  # ValueError: a moe field out of range
        raise MoeifyError(f"cannot load {folder}/config.json ({type(e).__name__}: {_one_line(e)})") from None


def _tokenizer_auto_map(folder: Path) -> object:
    try:
        config = json.loads((folder / TOKENIZER_CONFIG).read_text())
    except (OSError, ValueError, RecursionError):
        return None
    return config.get("auto_map") if isinstance(config, dict) else None


def _one_line(error: Exception, limit: int = 300) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
