"""Held-out perplexity, measured the same way before, during and after training.

Sequences are dealt round-robin to the processes; every process runs the same number of
forward passes (the last ones padded with a repeat that counts for nothing), so sharded
models (FSDP, ZeRO-3), whose forward passes are collective, stay in step.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

BATCH = 4  # held-out sequences per forward pass


def perplexity(model: nn.Module, sequences: torch.Tensor, accelerator, trained: bool = False) -> float:
    """exp(mean next-token NLL) over every held-out sequence: sequences (E, L).

    trained: the model being trained is scored with autograd recording (its graph dropped at once).
    Without autograd, moeify's remote format packs its experts into stacks and makes the parameters
    views of them, new storage under the optimizer and DDP's gradient buckets: the run would then
    depend on when it was scored (a resumed run would not reach the same weights, and 2 processes
    not those of 1).
    """
    rank, world = accelerator.process_index, accelerator.num_processes
    mine = list(range(rank, len(sequences), world))
    rounds = math.ceil(math.ceil(len(sequences) / world) / BATCH)
    totals = torch.zeros(2, dtype=torch.float64, device=accelerator.device)  # summed NLL, tokens
    was_training = model.training
    model.eval()
    with torch.enable_grad() if trained else torch.no_grad():
        for r in range(rounds):
            chosen = mine[r * BATCH:(r + 1) * BATCH]
            ids = sequences[chosen or [0]].to(accelerator.device)  # a spare forward keeps ranks in step
            nll = _nll(model(input_ids=ids).logits, ids).detach()
            if chosen:
                totals += torch.stack([nll, torch.tensor(ids[:, 1:].numel(), dtype=torch.float64)]).to(totals)
    model.train(was_training)
    nll_sum, tokens = accelerator.reduce(totals, reduction="sum").tolist()
    return math.exp(nll_sum / tokens)


def _nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL: logits (B, L, V), ids (B, L) -> scalar float64."""
    loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
    return loss.double()
