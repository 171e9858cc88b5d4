"""Router rows for a merge: fixed (random, zeros, uniform) or learnt from prompts (hidden, cheap-embed).

hidden: at each MoE layer, expert e's row points from the BASE model's FFN inputs on its negative
prompts (without any: on every expert's positive prompts, averaged over experts) to those on its
positive prompts (per-prompt means; the rows are centred across experts, which a softmax cannot
tell apart from the uncentred ones, then made unit length). One scale per
layer then sets how sharp routing is: the mean top-1 softmax weight over the prompts' tokens is
half-way between flat (1/E) and saturated (1). The first token of each prompt is left out of every
statistic: its state is the attention sink's, the same whatever the prompt.

cheap-embed: the same from the prompts' token embeddings, each normalised to unit RMS as an
RMSNorm with unit weight would, giving one row for every layer.

The base runs one decoder layer at a time (moeify.layerwise.LayerwiseModel, as calibration does):
the prompts go through in batches of similar length, each MoE layer's FFN inputs are taken by a
hook while that layer alone is loaded, and the run stops after the last MoE layer. Memory is the
embedding table (read whole, and dropped once the prompts are embedded), one decoder layer, and
the prompts' activations (at most MAX_TOKENS padded tokens), whatever the model's depth.

A merge learns the rows on a thread of its own (Learning.running) while it writes the shards:
the writer waits for a layer's row only when it reaches that layer's router, and the memory
above comes on top of the writer's (one layer's experts).

The routing report says, per layer, which expert the tokens of each expert's positive prompts
reach first (top-1) under the new routers, on the base's hidden states.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from moeify.adapters import Adapter
from moeify.errors import MoeifyError
from moeify.spec import Gate, Spec
from moeify.transforms import generator

if TYPE_CHECKING:
    from moeify.layerwise import Batch, LayerwiseModel
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


def learnt(spec: Spec, folder: Path, adapter: Adapter, layers: list[int], experts: Sequence[ExpertSource]) -> Gates:
    """Router rows of every MoE layer from the base model on the experts' prompts (hidden, cheap-embed)."""
    return Learning(spec, folder, adapter, layers, experts).run()


class Learning:
    """Prompt-learnt gates, set up at once and learnt by run(), or alongside a merge's writing.

    The setup (tokenizer, model skeleton, transformers' imports) is done in the constructor, so
    that a missing tokenizer is refused before anything is written, and never on a thread: imports
    racing the conversion's own could deadlock. Inside running(), a thread of its own learns the
    rows while the caller writes shards: row(layer) waits for that layer's row alone, gates() for
    all of them, and either raises what the thread raised. On leaving, the thread is told to stop
    before its next decoder layer and waited for, so that an error leaves nothing running.
    """

    def __init__(self, spec: Spec, folder: Path, adapter: Adapter, layers: list[int], experts: Sequence[ExpertSource]):
        from moeify.layerwise import LayerwiseModel
        from moeify.loading import Code, tokenizer_in

        tokenizer = tokenizer_in(folder, Code.FAMILY)
        if tokenizer is None:
            raise MoeifyError(f"--gate {spec.gate.value} reads prompts with BASE's tokenizer, which {folder} lacks; "
                              f"copy its tokenizer files in")
        self.spec, self.adapter, self.layers, self.experts = spec, adapter, layers, experts
        self.batch = PromptBatch.of(tokenizer, experts)
        self.runner = LayerwiseModel(folder, Code.FAMILY)  # the family's own classes, as the adapter reads them
        self._rows: dict[int, Future[torch.Tensor]] = {layer: Future() for layer in layers}
        self._gates: Future[Gates] = Future()
        self._stop = threading.Event()
        self._writer_waits = threading.Event()  # set once the writer asks for a row: it has nothing else to do

    def run(self, on_row: Callable[[int, torch.Tensor], None] = lambda layer, row: None,
            before_layer: Callable[[], None] = lambda: None) -> Gates:
        """Every row, in layer order; on_row(layer, row) is told each as it is learnt."""
        rows: dict[int, torch.Tensor] = {}
        shares: dict[int, list[list[float]]] = {}
        for layer, (row, share) in self._fits(before_layer):
            rows[layer], shares[layer] = row, share
            on_row(layer, row)
        return Gates(rows, report(self.spec, self.experts, shares))

    @contextmanager
    def running(self, on_layer: Callable[[int, int], None] = lambda done, total: None) -> Iterator[None]:
        """run() on a thread while the context lasts; on_layer(done, total) reports progress."""
        thread = threading.Thread(target=self._run, args=(on_layer,), name="moeify-gates", daemon=True)
        thread.start()
        try:
            yield
        finally:
            self._stop.set()
            thread.join()

    def row(self, layer: int) -> torch.Tensor:
        self._writer_waits.set()
        return self._rows[layer].result()

    def gates(self) -> Gates:
        return self._gates.result()

    def check(self) -> None:
        """Raise what the thread raised, if it has ended so; never waits. The writer asks at each layer:
        it writes the routers last, and a failure should not wait for every expert to be written."""
        if self._gates.done() and self._gates.exception() is not None:
            raise self._gates.exception()

    def _fits(self, before_layer: Callable[[], None]) -> Iterator[tuple[int, tuple[torch.Tensor, list[list[float]]]]]:
        if self.spec.gate is Gate.CHEAP_EMBED:  # one row for every layer
            embedded = self.runner.embeddings(self.batch.ids)
            fit = fit_rows(self.batch, embedded / embedded.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-6))
            yield from ((layer, fit) for layer in self.layers)
            return
        for layer, x in ffn_inputs(self.runner, self.adapter, self.batch, self.layers, before_layer):
            yield layer, fit_rows(self.batch, x)

    def _run(self, on_layer: Callable[[int, int], None]) -> None:
        def publish(layer: int, row: torch.Tensor) -> None:
            self._rows[layer].set_result(row)
            on_layer(sum(f.done() for f in self._rows.values()), len(self._rows))

        threads = torch.get_num_threads()
        try:
            self._gates.set_result(self.run(publish, lambda: self._next_layer(threads)))
        except BaseException as e:  # noqa: BLE001 -- raised again by whoever waits for a row
            for future in (*self._rows.values(), self._gates):
                if not future.done():
                    future.set_exception(e)
        finally:
            torch.set_num_threads(threads)

    def _next_layer(self, threads: int) -> None:
        """Before each layer: stop if told to, and leave a core to the writer while it works, take all
        once it waits.

        Two threads of matrix products beside the writer on two cores ran at a third of their speed
        alone (a product waits for its slower thread, and the writer takes a core from one of them
        now and then); one thread beside it keeps its pace, and the writer its own. torch's thread
        count is the process's: threads whose first parallel operation falls in this window keep
        the lower count (the writer's ran before).
        """
        self._check()
        wanted = threads if self._writer_waits.is_set() else max(1, threads - 1)
        if torch.get_num_threads() != wanted:
            torch.set_num_threads(wanted)

    def _check(self) -> None:
        if self._stop.is_set():
            raise _Stopped


class _Stopped(Exception):
    """The conversion ended first (an error, Ctrl-C): the rows are no longer wanted."""


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

    def groups(self) -> list[torch.Tensor]:
        """Row indices (b,) in groups of similar length, longest first, to run as batches of their own.

        A group takes prompts while they are at least 3/4 of its longest, so padding is at most a
        quarter of what runs: one right-padded batch spent half its work on padding when long and
        short prompts mix, one batch per prompt would pay the per-call cost of every layer each time.
        """
        lengths = self.real.sum(1)
        groups: list[list[int]] = []
        for b in lengths.argsort(descending=True, stable=True).tolist():
            if not groups or 4 * int(lengths[b]) < 3 * int(lengths[groups[-1][0]]):
                groups.append([])
            groups[-1].append(b)
        return [torch.tensor(rows) for rows in groups]


def _any_token(tokenizer) -> int:
    for token in (tokenizer.bos_token_id, tokenizer.eos_token_id, 0):
        if token is not None:
            return token


def fit_rows(batch: PromptBatch, x: torch.Tensor) -> tuple[torch.Tensor, list[list[float]]]:
    """Router rows (E, H) from FFN inputs x (B, T, H), and the top-1 shares they give (E x E)."""
    x = x.float()
    means = (x * batch.mask[..., None]).sum(1) / batch.mask.sum(1, keepdim=True)  # (B, H) per prompt
    positive = torch.stack([_mean(means, batch, e, True) for e in range(batch.experts)])
    # An expert without negative prompts is measured against the average expert's positive ones:
    # every state shares a large common part, which pos - neg cancels and pos alone keeps, so rows
    # with and without negatives would not compare (an expert with negatives among experts without
    # got none of its own tokens). With no negatives anywhere this is the centring below.
    average = positive.mean(0)
    negative = [_mean(means, batch, e, False) for e in range(batch.experts)]
    directions = positive - torch.stack([average if n is None else n for n in negative])
    directions = directions - directions.mean(0)
    norms = directions.norm(dim=1, keepdim=True)
    if float(norms.max()) <= 1e-6 * max(float(means.norm(dim=1).max()), 1e-30):
        raise MoeifyError("the experts' prompts give the same hidden states, so no router can tell them apart; "
                          "give each expert prompts of its own kind")
    directions = directions / norms.clamp_min(1e-6 * float(norms.max()))
    tokens = x[batch.mask & batch.positive[:, None]]  # (N, H)
    rows = directions * _sharpness(tokens @ directions.T)
    return rows, _top1_shares(batch, x, rows)


def _mean(means: torch.Tensor, batch: PromptBatch, e: int, positive: bool) -> torch.Tensor | None:
    """The mean of expert e's positive (or negative) prompt means; None when it has no such prompt."""
    chosen = means[(batch.expert == e) & (batch.positive == positive)]
    return chosen.mean(0) if len(chosen) else None


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


def ffn_inputs(runner: LayerwiseModel, adapter: Adapter, batch: PromptBatch, layers: list[int],
               before_layer: Callable[[], None] = lambda: None) -> Iterator[tuple[int, torch.Tensor]]:
    """(i, x): the FFN inputs x (B, T, H) of each of `layers` on the batch's prompts, in order, zero where
    the batch pads.

    The prompts run in groups of similar length (PromptBatch.groups), each cut to its longest prompt.
    The layers after the last of `layers` are never read. LayerwiseModel runs with no padding mask,
    and none is needed: under a causal mask a prompt's tokens never see the padding after them, so
    they get the states they would get alone (position ids count from 0 either way).
    before_layer() is called before the embeddings and each layer run (it may raise to stop).
    """
    groups = batch.groups()
    before_layer()
    states = runner.start([batch.ids[rows, : int(batch.real[rows].sum(1).max())] for rows in groups])
    for index in range(max(layers) + 1):
        before_layer()
        if index in layers:
            yield index, _padded(batch, groups, _layer_ffn_inputs(runner, adapter, index, states))
        else:
            runner.run_layer(index, states)


def _layer_ffn_inputs(runner: LayerwiseModel, adapter: Adapter, index: int, states: list[Batch]) -> list[torch.Tensor]:
    """Run layer `index` over every group, returning its FFN's input for each, (b, t, H)."""
    seen: list[torch.Tensor] = []
    runner.run_layer(index, states, lambda i, layer: _inputs(runner.model.get_submodule(adapter.mlp_path(i)), seen))
    assert len(seen) == len(states), "one FFN call per group"
    return seen


def _padded(batch: PromptBatch, groups: list[torch.Tensor], parts: list[torch.Tensor]) -> torch.Tensor:
    """The groups' (b, t, H) pieces back in the batch's right-padded layout, (B, T, H)."""
    x = parts[0].new_zeros(*batch.ids.shape, parts[0].shape[-1])
    for rows, part in zip(groups, parts):
        x[rows, : part.shape[1]] = part
    return x


@contextmanager
def _inputs(module: nn.Module, into: list[torch.Tensor]) -> Iterator[None]:
    """The first input of every call of module appended to `into` while the context lasts."""
    handle = module.register_forward_pre_hook(lambda m, args: into.append(args[0].detach()))
    try:
        yield
    finally:
        handle.remove()


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

