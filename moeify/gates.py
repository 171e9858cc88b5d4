"""Router rows for a merge: fixed (random, zeros, uniform) or learnt from prompts (hidden, cheap-embed).

hidden: at each MoE layer, expert e's row points from the BASE model's FFN inputs on its negative
prompts to those on its positive prompts (per-prompt means; the rows are centred across experts,
which a softmax cannot tell apart from the uncentred ones, then made unit length). One scale per
layer then sets how sharp routing is: the mean top-1 softmax weight over the prompts' tokens is
half-way between flat (1/E) and saturated (1). The first token of each prompt is left out of every
statistic: its state is the attention sink's, the same whatever the prompt.

cheap-embed: the same from the prompts' token embeddings, each normalised to unit RMS as an
RMSNorm with unit weight would, giving one row for every layer.

The base runs one decoder layer at a time (`LayerRunner`): the model is built with its parameters
on the meta device, the embedding table holds only the prompts' tokens, and each decoder layer's
weights are read from the checkpoint just before it runs and dropped right after. Memory is one
layer plus the prompts' activations (at most MAX_TOKENS padded tokens), whatever the model's depth;
the run stops after the last MoE layer.

The routing report says, per layer, which expert the tokens of each expert's positive prompts
reach first (top-1) under the new routers, on the base's hidden states.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from moeify.adapters import Adapter
from moeify.checkpoint import Checkpoint
from moeify.errors import MoeifyError
from moeify.spec import Gate, Spec
from moeify.transforms import generator

if TYPE_CHECKING:
    from moeify.merge import ExpertSource

MAX_PROMPT_TOKENS = 256  # tokens kept of each prompt
MAX_TOKENS = 16384  # padded prompt tokens run at once: activations stay a few hundred MB at hidden size 4096
PROMPTED = (Gate.HIDDEN, Gate.CHEAP_EMBED)


@dataclass
class Gates:
    """Router rows by layer, (E, H) float32 (one per source expert), and the routing report."""

    rows: dict[int, torch.Tensor]
    report: dict

    def row(self, layer: int) -> torch.Tensor:
        return self.rows[layer]


def fixed_router(spec: Spec, layer: int, experts: int, hidden: int) -> torch.Tensor:
    """(E, H) float32 for the gates that need no prompts."""
    if spec.gate is Gate.ZEROS:
        return torch.zeros(experts, hidden)
    gen = generator(spec.seed, layer, "router")
    if spec.gate is Gate.UNIFORM:  # nn.Linear's default: U(-1/sqrt(H), 1/sqrt(H))
        return (torch.rand(experts, hidden, generator=gen) * 2 - 1) / math.sqrt(hidden)
    return torch.randn(experts, hidden, generator=gen) * spec.router_std


def check_prompts(spec: Spec, experts: Sequence[ExpertSource]) -> None:
    """Prompt-learnt gates need positive prompts for every expert, and not the same ones for all."""
    if spec.gate not in PROMPTED:
        return
    missing = [f"{j} ({e.source})" for j, e in enumerate(experts) if not e.positive]
    if missing:
        raise MoeifyError(f"--gate {spec.gate.value} needs positive prompts for every expert; expert "
                          f"{', '.join(missing)} has none: give --expert SOURCE:PROMPTS or --prompts FILE")
    if len({(e.positive, e.negative) for e in experts}) == 1:
        raise MoeifyError(f"every expert has the same prompts, so --gate {spec.gate.value} cannot tell them "
                          f"apart; give each expert prompts of its own kind")


def learnt(spec: Spec, folder: Path, adapter: Adapter, layers: list[int], experts: Sequence[ExpertSource],
           on_layer: Callable[[int, int], None] = lambda done, total: None) -> Gates:
    """Router rows of every MoE layer from the base model on the experts' prompts (hidden, cheap-embed).

    on_layer(done, total) reports progress over the MoE layers.
    """
    from moeify.loading import Code, tokenizer_in

    tokenizer = tokenizer_in(folder, Code.FAMILY)
    if tokenizer is None:
        raise MoeifyError(f"--gate {spec.gate.value} reads prompts with BASE's tokenizer, which {folder} lacks; "
                          f"copy its tokenizer files in")
    batch = PromptBatch.of(tokenizer, experts)
    runner = LayerRunner(folder, adapter, batch.ids)
    rows: dict[int, torch.Tensor] = {}
    shares: dict[int, list[list[float]]] = {}

    def fit(layer: int, x: torch.Tensor) -> None:
        rows[layer], shares[layer] = fit_rows(batch, x)
        on_layer(len(rows), len(layers))

    if spec.gate is Gate.HIDDEN:
        runner.ffn_inputs(batch.real, layers, fit)
    else:
        embedded = runner.embeddings().float()
        row, share = fit_rows(batch, embedded / embedded.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-6))
        rows, shares = {i: row for i in layers}, {i: share for i in layers}
    return Gates(rows, report(spec, experts, shares))


def report(spec: Spec, experts: Sequence[ExpertSource], shares: dict[int, list[list[float]]]) -> dict:
    """moeify.json's routing report: per layer, row e = where expert e's prompt tokens go first (shares)."""
    own = {i: [m[e][e] for e in range(len(m))] for i, m in shares.items()}
    names = [Path(e.source).name if Path(e.source).exists() else e.source for e in experts]  # no local paths
    return {"gate": spec.gate.value, "experts": names,
            "mean_own_share": sum(sum(v) for v in own.values()) / max(sum(len(v) for v in own.values()), 1),
            "top1_shares": {str(i): [[round(s, 4) for s in row] for row in m] for i, m in shares.items()}}


# ---------------------------------------------------------------------------- prompts


@dataclass(frozen=True)
class PromptBatch:
    """Every prompt of every expert, right-padded into one batch.

    ids, real, mask: (B, T); real marks the prompt's tokens (the rest is padding), mask those the
    statistics use (all but the first). expert[b]: the expert prompt b belongs to; positive[b]:
    whether it is a positive prompt of it.
    """

    ids: torch.Tensor
    real: torch.Tensor
    mask: torch.Tensor
    expert: torch.Tensor
    positive: torch.Tensor
    experts: int

    @classmethod
    def of(cls, tokenizer, experts: Sequence[ExpertSource]) -> PromptBatch:
        rows, owner, kind = [], [], []
        for e, source in enumerate(experts):
            for prompts, positive in ((source.positive, True), (source.negative, False)):
                for prompt in prompts:
                    rows.append(tokenizer(prompt)["input_ids"][:MAX_PROMPT_TOKENS] or [_any_token(tokenizer)])
                    owner.append(e)
                    kind.append(positive)
        width = max(len(r) for r in rows)
        if width * len(rows) > MAX_TOKENS:
            raise MoeifyError(f"the prompts make a batch of {len(rows)} x {width} tokens, over the {MAX_TOKENS} "
                              f"moeify runs at once; use fewer or shorter prompts")
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        real = torch.zeros(len(rows), width, dtype=torch.bool)
        mask = real.clone()
        for b, r in enumerate(rows):
            ids[b, : len(r)] = torch.tensor(r)
            real[b, : len(r)] = True
            mask[b, min(1, len(r) - 1): len(r)] = True  # a one-token prompt keeps its only token
        return cls(ids, real, mask, torch.tensor(owner), torch.tensor(kind), len(experts))


def _any_token(tokenizer) -> int:
    for token in (tokenizer.bos_token_id, tokenizer.eos_token_id, 0):
        if token is not None:
            return token


def fit_rows(batch: PromptBatch, x: torch.Tensor) -> tuple[torch.Tensor, list[list[float]]]:
    """Router rows (E, H) from FFN inputs x (B, T, H), and the top-1 shares they give (E x E)."""
    x = x.float()
    means = (x * batch.mask[..., None]).sum(1) / batch.mask.sum(1, keepdim=True)  # (B, H) per prompt
    directions = torch.stack([_mean(means, batch, e, True) - _mean(means, batch, e, False)
                              for e in range(batch.experts)])
    directions = directions - directions.mean(0)
    norms = directions.norm(dim=1, keepdim=True)
    if float(norms.max()) <= 1e-6 * max(float(means.norm(dim=1).max()), 1e-30):
        raise MoeifyError("the experts' prompts give the same hidden states, so no router can tell them apart; "
                          "give each expert prompts of its own kind")
    directions = directions / norms.clamp_min(1e-6 * float(norms.max()))
    tokens = x[batch.mask & batch.positive[:, None]]  # (N, H)
    rows = directions * _sharpness(tokens @ directions.T)
    return rows, _top1_shares(batch, x, rows)


def _mean(means: torch.Tensor, batch: PromptBatch, e: int, positive: bool) -> torch.Tensor:
    chosen = means[(batch.expert == e) & (batch.positive == positive)]
    return chosen.mean(0) if len(chosen) else means.new_zeros(means.shape[1])


def _sharpness(logits: torch.Tensor) -> float:
    """The scale s at which the mean top-1 softmax weight of s * logits (N, E) is half-way between 1/E and 1.

    That weight grows with s from 1/E towards 1: a coarse then a fine grid of log s, each one batched op.
    """
    target = (1 + 1 / logits.shape[1]) / 2
    centre, step = 0.0, 0.5  # log s from -30 to 30, then within one coarse step of the best
    for points in (121, 101):
        grid = centre + step * torch.linspace(-(points // 2), points // 2, points)
        top1 = (logits[None] * grid.exp()[:, None, None]).softmax(-1).amax(-1).mean(-1)  # (points,)
        centre, step = float(grid[(top1 - target).abs().argmin()]), step / 50
    return math.exp(centre)


def _top1_shares(batch: PromptBatch, x: torch.Tensor, rows: torch.Tensor) -> list[list[float]]:
    first = (x @ rows.T).argmax(-1)  # (B, T)
    out = []
    for e in range(batch.experts):
        chosen = first[batch.mask & ((batch.expert == e) & batch.positive)[:, None]]
        counts = torch.bincount(chosen, minlength=batch.experts).double()
        out.append((counts / max(float(counts.sum()), 1.0)).tolist())
    return out


# ---------------------------------------------------------------------------- layer by layer


class _Done(Exception):
    """Raised inside the forward once the last layer wanted has been seen: the rest need not run."""


class LayerRunner:
    """A dense model of the checkpoint run one decoder layer at a time on a fixed batch of token ids.

    Parameters start on the meta device (buffers such as rotary frequencies are real); the embedding
    table is cut down to the rows of `ids` (their ids renumbered), other tensors outside the decoder
    layers are read once, and each layer's tensors are read as it starts and released as it ends.
    """

    def __init__(self, folder: Path, adapter: Adapter, ids: torch.Tensor):
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        self.adapter = adapter
        self.ckpt = adapter.loaded(Checkpoint(folder))
        config = AutoConfig.for_model(**self.ckpt.config)
        with init_empty_weights(include_buffers=False):
            self.model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
        self.vocab, self.ids = torch.unique(ids, return_inverse=True)  # the prompts' own small vocabulary
        self.embedding = self.model.get_input_embeddings()
        self.embedding.padding_idx = None  # ids are renumbered; padding_idx only matters for gradients
        self._names = set(dict(self.model.named_parameters()))
        self._layer_names: dict[int, list[str]] = {}  # each layer's tensors, found once
        self._load_outside_layers()

    def embeddings(self) -> torch.Tensor:
        """The raw token embeddings of the batch: (B, T, H)."""
        return self.embedding.weight[self.ids]

    def layer_path(self, layer: int) -> str:
        return self.adapter.mlp_path(layer).rsplit(".", 1)[0]

    def ffn_inputs(self, real: torch.Tensor, layers: list[int], each: Callable[[int, torch.Tensor], None]) -> None:
        """Run the batch (real: (B, T), False on padding) up to the last of `layers`; each(i, x (B, T, H)) at
        each one's FFN input."""
        last = max(layers)

        def seen(layer: int):
            def hook(module, args):
                each(layer, args[0].detach())
                if layer == last:
                    raise _Done
            return hook

        count = self.adapter.num_layers(self.ckpt.config)
        with self._hooks(count, {i: seen(i) for i in layers}), torch.no_grad():
            try:
                self.model.base_model(input_ids=self.ids, attention_mask=real.long(), use_cache=False)
            except _Done:
                pass

    @contextmanager
    def _hooks(self, count: int, at_ffn: dict[int, Callable]) -> Iterator[None]:
        handles = []
        for i in range(count):
            layer = self.model.get_submodule(self.layer_path(i))
            handles += [layer.register_forward_pre_hook(lambda m, a, i=i: self._place(i, "cpu")),
                        layer.register_forward_hook(lambda m, a, o, i=i: self._place(i, "meta"))]
            if i in at_ffn:
                handles.append(self.model.get_submodule(self.adapter.mlp_path(i)).register_forward_pre_hook(at_ffn[i]))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            for i in range(count):
                self._place(i, "meta")  # a stopped run leaves its last layer loaded otherwise

    def _place(self, layer: int, device: str) -> None:
        """Read one decoder layer's tensors into it (cpu), or release them (meta)."""
        if layer not in self._layer_names:
            prefix = self.layer_path(layer) + "."
            self._layer_names[layer] = [n for n in self.ckpt.names() if n.startswith(prefix) and n in self._names]
        for name in self._layer_names[layer]:
            self._set(name, self.ckpt.read(name) if device == "cpu" else None)

    def _load_outside_layers(self) -> None:
        layers = self.adapter.mlp.split("{i}")[0]
        inside = self.model.base_model_prefix + "."
        table = next(n for n, p in self.model.named_parameters() if p is self.embedding.weight)
        for name in self.ckpt.names():
            if name.startswith(inside) and not name.startswith(layers) and name in self._names:
                value = self.ckpt.read(name)
                self._set(name, value[self.vocab] if name == table else value)

    def _set(self, name: str, value: torch.Tensor | None) -> None:
        """Put a float32 copy of value in the model as parameter `name`; None leaves a meta tensor of its shape."""
        module_name, _, attribute = name.rpartition(".")
        module = self.model.get_submodule(module_name)
        if value is None:
            value = torch.empty(getattr(module, attribute).shape, device="meta")
        setattr(module, attribute, nn.Parameter(value.float(), requires_grad=False))


def routing_lines(gates: Gates) -> list[str]:
    """The routing report for the terminal: per layer, the share of each expert's prompt tokens it gets first."""
    report = gates.report
    names = [Path(s).name or s for s in report["experts"]]
    lines = [f"routing ({report['gate']} gates): share of each expert's prompt tokens it gets first, per layer",
             "layer  " + "  ".join(f"{n[:12]:>12}" for n in names)]
    for layer, matrix in report["top1_shares"].items():
        lines.append(f"{layer:>5}  " + "  ".join(f"{matrix[e][e]:>12.0%}" for e in range(len(names))))
    lines.append(f"mean: {report['mean_own_share']:.0%} of prompt tokens reach their own expert first "
                 f"(chance: {1 / len(names):.0%})")
    return lines

