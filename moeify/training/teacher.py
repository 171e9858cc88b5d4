"""Where the distillation teacher lives: placed by the same engine as the student.

- One process, DDP: a full copy on each process's device (it has no gradients to synchronise).
- FSDP 2: sharded by accelerate's own FSDP 2 preparation, with the launcher's settings (reshard
  after forward, offload, mixed precision), each of the teacher's decoder layers its own unit
  (its `_no_split_modules`: the config names the student's classes). Its forward passes are then
  collective, which the loop already guarantees: every process runs the same passes.
- DeepSpeed: a full copy per process (ZeRO-3 partitions only the model it is given).

It is never registered with the Accelerator, so checkpoints hold the student alone.
"""

from __future__ import annotations

from torch import nn


def place(teacher: nn.Module, accelerator) -> nn.Module:
    """The frozen teacher, on each process's device or sharded over the processes (FSDP 2)."""
    teacher.requires_grad_(False)
    teacher.eval()
    if getattr(accelerator, "is_fsdp2", False):
        return _sharded(teacher, accelerator)
    return teacher.to(accelerator.device)


def _sharded(teacher: nn.Module, accelerator) -> nn.Module:
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    plugin = accelerator.state.fsdp_plugin
    wrapped = plugin.transformer_cls_names_to_wrap
    plugin.transformer_cls_names_to_wrap = list(getattr(teacher, "_no_split_modules", None) or [])
    try:
        return fsdp2_prepare_model(accelerator, teacher)
    finally:
        plugin.transformer_cls_names_to_wrap = wrapped


def share(model: nn.Module) -> float:
    """The fraction of the model's parameter elements held by this process (1.0 unsharded)."""
    local = full = 0
    for parameter in model.parameters():
        full += parameter.numel()
        local += getattr(parameter, "_local_tensor", parameter).numel()
    return local / full
