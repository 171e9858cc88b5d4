"""Writing the trained model: the input's format, names and dtypes, through the staged output.

transformers' save_pretrained writes the tensors (native MoE classes map their fused in-memory
experts back to the per-expert names they load from); everything else comes verbatim from the
input folder: config.json (so the dtype and every field stay as they were), the remote code,
tokenizer, chat template and generation config. moeify.json gains a `training` entry and the
card a Training section.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from moeify import card
from moeify.checkpoint import Checkpoint
from moeify.errors import MoeifyFailure
from moeify.output import staged_output
from moeify.training import lora
from moeify.training.checkpoints import LOG

RECORD = "moeify.json"
# Written fresh, not copied: the weights, their index, the card and the record.
NOT_COPIED = {"model.safetensors.index.json", card.CARD, RECORD, LOG}


def write(model: nn.Module, state: dict[str, torch.Tensor], source: Path, output: Path, overwrite: bool,
          entry: dict, section: str, log: Path | None, adapter: Path | None = None) -> None:
    """The trained model into output, in the format of the model folder `source`; `adapter`, a LoRA
    adapter folder (--no-merge-lora), moves into output/adapter."""
    before = Checkpoint(source)
    record = json.loads((source / RECORD).read_text())
    with staged_output(output, overwrite, protect=[source]) as staging:
        model.save_pretrained(staging, state_dict=cast(state, before), safe_serialization=True,
                              max_shard_size=record.get("max_shard_size", "5GB"))
        _same_tensors(before, Checkpoint(staging))
        _copy_side_files(source, staging)
        record["training"] = [*record.get("training", []), entry]
        (staging / RECORD).write_text(json.dumps(record, indent=2) + "\n")
        if (source / card.CARD).is_file():  # its front matter keeps license and base model
            shutil.copy2(source / card.CARD, staging / card.CARD)
        card.refresh(staging, output.name)
        with open(staging / card.CARD, "a") as f:
            f.write("\n" + section)
        if log is not None and log.is_file():
            shutil.copy2(log, staging / LOG)
        if adapter is not None:
            shutil.move(adapter, staging / lora.ADAPTER)


def cast(state: dict[str, torch.Tensor], before: Checkpoint) -> dict[str, torch.Tensor]:
    """Each float tensor back to its dtype in the input (names the input lacks: its usual float dtype)."""
    floats = Counter(info.dtype for info in before.tensors.values() if info.dtype.is_floating_point)
    usual = floats.most_common(1)[0][0] if floats else torch.float32
    out = {}
    for name, tensor in state.items():
        info = before.tensors.get(name)
        dtype = info.dtype if info is not None else usual
        out[name] = tensor.detach().to("cpu", dtype) if tensor.is_floating_point() else tensor.detach().cpu()
    return out


def _same_tensors(before: Checkpoint, after: Checkpoint) -> None:
    """The written checkpoint must hold exactly the input's tensor names, shapes and dtypes."""
    def layout(ckpt: Checkpoint) -> dict:
        return {name: (info.shape, info.dtype) for name, info in ckpt.tensors.items()}

    differ = sorted(set(layout(before).items()) ^ set(layout(after).items()))
    if differ:
        raise MoeifyFailure(f"the trained checkpoint would not match the input's layout ({differ[0][0]} differs); "
                            f"nothing was written; this is a moeify bug, please report it")


def _copy_side_files(source: Path, dest: Path) -> None:
    """config.json, remote code, tokenizer and the rest, verbatim: the output reads as the input did."""
    for path in sorted(source.iterdir()):
        if path.is_file() and not path.name.startswith(".") and path.name not in NOT_COPIED \
                and path.suffix != ".safetensors":
            shutil.copy2(path, dest / path.name)
