"""Growing a MoE: N more routed experts in every MoE layer, top-k, granularity groups and format kept.

The source is read through its `MoESource` (moeify remote, Mixtral, Qwen2-MoE, Qwen3-MoE) in the
single conversion pass; each layer's old experts pass through and the new ones are appended: copies
of one old expert group (copy:J, or per layer the busiest on the built-in text), or a dense model's
FFN (cut into the source's groups). What the new experts do at step 0 depends on the format:

- remote: the router's aux-loss-free selection bias (`expert_bias`, float32, used for top-k
  selection only) is switched on with the new experts at SELECTION_BIAS, below every softmax
  probability, so they are never chosen and the weights of the chosen (old) ones are what they
  were: exact, whenever top-k weights are renormalised or unit. Training lifts the new experts'
  bias by aux_free_update_rate a step while they are under-loaded, so they enter gradually.
- Mixtral, Qwen2-MoE, Qwen3-MoE have no bias, and a router row alone cannot lower a logit for every
  possible input: a new row is its origin's row pushed down a direction on which the layer's inputs
  (on the first half of the built-in text, in short sequences) all project positively, by the least
  amount that keeps it below the k-th old logit by MARGIN on every one of those tokens (below the
  largest by FLAT when top-k weights are not renormalised). Other text may still reach a new expert,
  so the output is measured against the source on the other half and the summary says by how much
  they differ.

`--freeze old` records the old experts' indices in config.json: `moe.frozen_experts` (remote), or
`frozen_experts` at the top level (native). A trainer keeps those experts' weights fixed;
`frozen_parameters` names them in a loaded model.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch import nn
from transformers import PretrainedConfig

from moeify.adapters import Adapter, adapter_for
from moeify.checkpoint import Checkpoint
from moeify.errors import MoeifyError
from moeify.moe_source import MoESource, field_of, moe_source_for
from moeify.spec import Mode, Spec
from moeify.transforms import FFN, MoELayer, Scoring, add_noise, generator, pieces

COPY, BUSIEST = "copy:", "copy:busiest"
SELECTION_BIAS = -1.0 - 2**-10  # below any softmax probability: a new expert's score never reaches an old one's
MARGIN = 1.0  # renormalised top-k: new logits at least this far below the k-th old logit on the sample text
FLAT = 40.0  # softmax over all experts: new logits this far below the largest, e^-40 of its weight
SAMPLE_TOKENS = 512  # tokens of the built-in text the native rows and copy:busiest are fitted on
CHUNK = 32  # tokens per sample sequence


@dataclass(frozen=True)
class BiasedLayer(MoELayer):
    """A MoE layer whose top-k selection adds selection_bias (E,) float32 to the routing scores (remote)."""

    selection_bias: torch.Tensor | None = None


@dataclass(frozen=True)
class Push:
    """How one layer's new router rows are pushed below the old ones: row = origin row - amount * direction."""

    direction: torch.Tensor  # (H,) unit mean of the layer's inputs on the sample text
    amount: float
    missed: int  # sample tokens where no amount suffices (their projection on direction is not positive)


@dataclass(frozen=True)
class Growth:
    """What expand adds, decided before the pass."""

    groups: int  # G: consecutive experts sharing a router row (granularity), kept for the new ones
    old: int  # routed experts before
    added: int  # new groups (added * G new experts)
    origins: dict[int, list[int]] | None  # layer -> the old group each new group copies; None: from a dense model
    biased: bool  # remote: exact through the selection bias
    pushes: dict[int, Push]  # native: how each layer's new rows are pushed down
    freeze: bool

    @property
    def frozen(self) -> list[int]:
        return list(range(self.old)) if self.freeze else []


@dataclass(frozen=True)
class ExpandSource(MoESource):
    """A MoE source whose output config records the growth (selection bias, frozen experts)."""

    growth: Growth | None = None

    @classmethod
    def of(cls, source: MoESource, growth: Growth) -> ExpandSource:
        return cls(**{f.name: getattr(source, f.name) for f in fields(MoESource)}, growth=growth)

    def output_config(self, config: dict, moe: MoELayer, dtype: str) -> PretrainedConfig:
        out = super().output_config(config, moe, dtype)
        frozen = {"frozen_experts": self.growth.frozen} if self.growth.freeze else {}
        if self.model_type == "moeify":
            out.moe = out.moe | frozen | ({"aux_free_bias": True} if self.growth.biased else {})
        for name, value in frozen.items() if self.model_type != "moeify" else ():
            setattr(out, name, value)
        return out


# ---------------------------------------------------------------------------- the source


def moe_of(config: dict, name: str) -> MoESource:
    """The MoE reader of the source; a dense model, or one expand cannot grow exactly, is one line."""
    source = moe_source_for(config)
    if source is None:
        raise MoeifyError(f"{name} is a dense {config.get('model_type')} model; expand grows a MoE "
                          f"(make one with moeify upcycle or moeify merge first)")
    return source


def groups_of(folder: Path, ckpt: Checkpoint, source: MoESource) -> int:
    """G, the experts sharing a router row: moeify's record of the conversion, when the routers still agree."""
    try:
        record = json.loads((folder / "moeify.json").read_text())
        G = int(record.get("granularity", 1)) if record.get("mode") in ("upcycle", "merge", "expand") else 1
    except (OSError, ValueError, TypeError, AttributeError, RecursionError):
        return 1
    if G <= 1 or source.count % G or source.topk(ckpt.config) % G:
        return 1
    router = ckpt.read(source.ffn_names(source.moe_layers(ckpt.config)[0])["router"])
    same = all(torch.equal(router[j], router[j - j % G]) for j in range(source.count))
    return G if same else 1  # trained routers that drifted apart: every expert is its own group


def renormalised(config: dict, source: MoESource) -> bool:
    """Whether the chosen experts' weights are renormalised over the top k (or unit), so others' logits do not matter."""
    if source.model_type == "moeify":
        return source.scoring is Scoring.UNIT or bool(field_of(config, "moe.norm_topk_prob", True))
    if source.model_type == "mixtral":
        return True
    return bool(config.get("norm_topk_prob", False))


def parse_from(text: str, groups: int) -> int | str | None:
    """--from: an old group index (copy:J), BUSIEST, or None for a model given by name."""
    if not text.startswith(COPY):
        return None
    if text == BUSIEST:
        return BUSIEST
    try:
        j = int(text[len(COPY):])
    except ValueError:
        raise MoeifyError(f"--from {text!r}: use copy:J with J an expert index, copy:busiest, or a model") from None
    if not 0 <= j < groups:
        raise MoeifyError(f"--from {text}: the source has experts 0..{groups - 1}"
                          + (" (counting groups of pieces that share a router row)" if groups else ""))
    return j


def dense_reader(folder: Path, name: str, source: MoESource, config: dict, groups: int) -> tuple[Adapter, Checkpoint]:
    """The dense model new experts come from (--from SOURCE): its FFNs must fit the MoE's experts."""
    ckpt = Checkpoint(folder)
    if moe_source_for(ckpt.config) is not None:
        raise MoeifyError(f"--from {name} is a MoE; new experts come from a dense model's FFN, or copy:J")
    adapter = adapter_for(ckpt.config)
    ckpt = adapter.loaded(ckpt)
    hidden, vocab = field_of(config, source.hidden_field), field_of(config, "vocab_size|base_config.vocab_size")
    if ckpt.config.get(adapter.hidden_field) != hidden or ckpt.config.get("vocab_size") != vocab:
        raise MoeifyError(f"--from {name} has hidden size {ckpt.config.get(adapter.hidden_field)} and vocabulary "
                          f"{ckpt.config.get('vocab_size')}, the MoE {hidden} and {vocab}; use a model of the MoE's base")
    width = field_of(config, source.width_field) * groups
    if adapter.num_layers(ckpt.config) != source.num_layers(config) or adapter.read_ffn(ckpt, 0, meta=True).intermediate_size != width:
        raise MoeifyError(f"--from {name}'s layers or FFN width differ from the MoE's (FFN width {width}, "
                          f"{source.num_layers(config)} layers); use a model of the MoE's base")
    if not adapter.gated or adapter.bias:
        raise MoeifyError(f"--from {name}: its FFN layout differs from the MoE's experts")
    return adapter, ckpt


# ---------------------------------------------------------------------------- the sample text


@dataclass
class Sample:
    """The source MoE on the built-in text: each MoE layer's inputs (T, H) and expert load (E,)."""

    inputs: dict[int, torch.Tensor]
    load: dict[int, torch.Tensor]


def halves() -> tuple[str, str]:
    """The built-in text cut in two: new router rows are fitted on the first half, measured on the second."""
    from moeify.verify import load_text

    text = load_text(None)
    return text[: len(text) // 2], text[len(text) // 2:]


def sample(folder: Path, topk: int) -> Sample:
    """Run the source (loaded whole, float32) on the first half of the built-in text, keeping each MoE layer's inputs."""
    from moeify import verify
    from moeify.loading import load_model, tokenizer_in

    tokenizer = tokenizer_in(folder)
    if tokenizer is None:
        raise MoeifyError(f"{folder} has no tokenizer; copy:busiest and native formats run the MoE on text to place "
                          f"the new experts: copy its tokenizer files in")
    ids = verify.token_ids(halves()[0], tokenizer, SAMPLE_TOKENS)
    model = load_model(folder)
    found = verify.blocks(model)
    inputs: dict[int, torch.Tensor] = {}
    hooks = [b.module.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0].reshape(-1, a[0].shape[-1]).float()))
             for i, b in found.items()]
    with torch.no_grad():
        model(chunks(ids, tokenizer.bos_token_id))
    for hook in hooks:
        hook.remove()
    load = {i: torch.bincount(verify.choice(found[i].router, x, topk).reshape(-1),
                              minlength=found[i].router.weight.shape[0]) for i, x in inputs.items()}
    return Sample(inputs, load)


def chunks(ids: torch.Tensor, bos: int | None) -> torch.Tensor:
    """(N, CHUNK) short sequences of ids, each led by bos when the tokenizer has one.

    A sequence's first position is where a layer's input differs most from the rest (attention can
    only look at itself); sequences of a model that starts them with BOS always begin with that one state.
    """
    if bos is not None:
        ids = ids[ids != bos]
    width = CHUNK - (bos is not None)
    rows = ids[: max(len(ids) // width, 1) * width].reshape(-1, min(width, len(ids)))
    return rows if bos is None else torch.cat([torch.full((len(rows), 1), bos), rows], dim=1)


def busiest(load: torch.Tensor, groups: int) -> int:
    """The group with the most top-k selections."""
    return int(load.reshape(-1, groups).sum(1).argmax())


def push(x: torch.Tensor, router: torch.Tensor, base: torch.Tensor, topk: int, renorm: bool) -> Push:
    """The least push of `base` (H,) down the mean input direction keeping it below the old logits on x (T, H).

    Renormalised top-k: below the k-th old logit by MARGIN; otherwise below the largest by FLAT.
    """
    logits = x @ router.float().T  # (T, E)
    bar = logits.topk(topk, dim=-1).values[:, -1] - MARGIN if renorm else logits.max(-1).values - FLAT
    direction = common_direction(x)
    along = x @ direction
    need = x @ base.float() - bar  # how far each token's new logit must come down
    fixable = along > 0
    amount = float((need[fixable] / along[fixable]).clamp_min(0).max()) if fixable.any() else 0.0
    return Push(direction, amount, int(((need > 0) & ~fixable).sum()))


def common_direction(x: torch.Tensor, steps: int = 300) -> torch.Tensor:
    """(H,) a unit direction on which every row of x (T, H) projects as positively as possible (max-min cosine).

    Starts at the mean direction and climbs a soft minimum of the rows' cosines with it.
    """
    rows = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    direction = rows.mean(0) / rows.mean(0).norm().clamp_min(1e-12)
    for _ in range(steps):
        weights = torch.softmax(-50.0 * (rows @ direction), dim=0)  # the worst-served rows count most
        direction = direction + 0.05 * (weights @ rows)
        direction = direction / direction.norm().clamp_min(1e-12)
    return direction


# ---------------------------------------------------------------------------- the transform


def grow(moe: MoELayer, spec: Spec, layer: int, growth: Growth,
         dense_ffn: Callable[[int, bool], FFN] | None) -> BiasedLayer:
    """The old layer with growth.added groups of new experts appended (router rows and, remote, selection bias)."""
    G, old = growth.groups, len(moe.experts)
    meta = moe.router.is_meta
    origins = growth.origins[layer] if growth.origins else None

    def group(n: int) -> tuple[list[FFN], torch.Tensor]:
        if origins is None:
            like = moe.experts[0].up
            ffn = dense_ffn(layer, meta).map(lambda role, t: t.to(like.dtype))
            made = [p.scaled(G) for p in pieces(ffn, G)]
            row = moe.router.float().mean(0)
        else:
            made, row = list(moe.experts[origins[n] * G:(origins[n] + 1) * G]), moe.router[origins[n] * G].float()
        gen = generator(spec.seed, layer, "new expert", n)
        made = [add_noise(p, spec.noise, gen) for p in made]
        if layer in growth.pushes and not meta:
            row = row - growth.pushes[layer].amount * growth.pushes[layer].direction
        return made, row

    made = [group(n) for n in range(growth.added)]
    experts = [*moe.experts, *(p for ffns, _ in made for p in ffns)]
    rows = torch.stack([row for _, row in made]).to(moe.router.dtype).repeat_interleave(G, dim=0) if not meta \
        else moe.router.new_empty(growth.added * G, moe.router.shape[1])
    bias = None
    if growth.biased:
        bias = torch.cat([torch.zeros(old), torch.full((growth.added * G,), SELECTION_BIAS)])
        bias = bias.to("meta") if meta else bias
    return BiasedLayer(experts=experts, router=torch.cat([moe.router, rows]), topk=moe.topk, scoring=moe.scoring,
                       selection_bias=bias)


# ---------------------------------------------------------------------------- training


def frozen_parameters(model: nn.Module, config: PretrainedConfig) -> list[str]:
    """Names of the parameters of the experts config.json records as frozen (per-expert modules: remote)."""
    moe = getattr(config, "moe", None)
    frozen = (moe or {}).get("frozen_experts") if isinstance(moe, dict) else getattr(config, "frozen_experts", None)
    if not frozen:
        return []
    pattern = re.compile(r"\.experts\.(\d+)\.")
    return [name for name, _ in model.named_parameters()
            if (m := pattern.search(name)) and int(m.group(1)) in set(frozen)]


def expand_spec(config: dict, source: MoESource, groups: int, add: int, **options) -> Spec:
    """The Spec of an expansion: the source's layers, top-k and groups, `add` more groups of experts."""
    if isinstance(add, bool) or not isinstance(add, int) or add < 1:
        raise MoeifyError(f"--add must be at least 1 (got {add})")
    layers = source.moe_layers(config)
    every = len(layers) == source.num_layers(config)
    return Spec(mode=Mode.EXPAND, experts=source.count // groups + add, topk=source.topk(config) // groups,
                granularity=groups, moe_layers="all" if every else ",".join(map(str, layers)), add=add, **options)


# ---------------------------------------------------------------------------- the whole expansion


@dataclass
class Expansion:
    """What the conversion pass needs for an expansion, and what to say about it."""

    spec: Spec
    reader: ExpandSource
    transform: Callable[[MoELayer, Spec, int], BiasedLayer]
    notes: dict  # moeify.json's "expansion"


def prepare(folder: Path, name: str, add: int, expand_from: str, freeze_old: bool, folders: dict[str, Path],
            **options) -> Expansion:
    """Read the source MoE, decide where the new experts come from and how they are kept out at step 0."""
    ckpt = Checkpoint(folder)
    config = ckpt.config
    if config.get("model_type") == "moeify" and field_of(config, "moe.aux_free_bias"):
        raise MoeifyError(f"{name} already balances with aux_free_bias (per-expert selection biases); expand "
                          f"does not grow such a checkpoint")
    source = moe_of(config, name)
    G = groups_of(folder, ckpt, source)
    spec = expand_spec(config, source, G, add, expand_from=expand_from, freeze_old=freeze_old, **options)
    origin = parse_from(expand_from, source.count // G)
    dense = dense_reader(folders[expand_from], expand_from, source, config, G) if origin is None else None
    topk, renorm = source.topk(config), renormalised(config, source)
    biased = source.model_type == "moeify" and renorm
    layers = source.moe_layers(config)
    sampled = sample(folder, topk) if origin == BUSIEST or not biased else None
    origins = None if dense else {i: [busiest(sampled.load[i], G) if origin == BUSIEST else origin] * add
                                  for i in layers}
    pushes = {} if biased else {i: _push(ckpt, source, sampled, i, origins, G, topk, renorm) for i in layers}
    growth = Growth(G, source.count, add, origins, biased, pushes, freeze_old)
    read_dense = (lambda layer, meta: dense[0].read_ffn(dense[1], layer, meta)) if dense else None
    notes = {"exact_at_init": biased, "groups": G, "origins": origins,
             "tokens_not_kept_off": sum(p.missed for p in pushes.values())}
    return Expansion(spec, ExpandSource.of(source, growth),
                     lambda moe, spec_, layer: grow(moe, spec_, layer, growth, read_dense), notes)


def _push(ckpt: Checkpoint, source: MoESource, sampled: Sample, layer: int, origins: dict | None, G: int,
          topk: int, renorm: bool) -> Push:
    router = ckpt.read(source.ffn_names(layer)["router"]).float()
    base = router.mean(0) if origins is None else router[origins[layer][0] * G]
    return push(sampled.inputs[layer], router, base, topk, renorm)


def measured(folder: Path, output: Path) -> float | None:
    """The largest logit difference between the source and the output on the second half of the built-in text."""
    from moeify import verify

    try:
        report = verify.verify(str(folder), str(output), halves()[1], tokens=SAMPLE_TOKENS)
    except MoeifyError:  # no tokenizer, or a text too short: not measured
        return None
    return report.max_logit_diff
