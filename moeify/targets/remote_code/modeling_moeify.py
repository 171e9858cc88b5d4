"""moeify's remote-format model (copied as-is into every remote output; imports only torch and transformers).

`MoeifyForCausalLM` builds the source family's own *ForCausalLM from `config.base_config`, so
attention, norms and rotary embeddings are exactly the source's, then swaps the FFN at
`moe.mlp_path` of every layer in `moe.moe_layers` for a `MoeifyBlock`. The family's modules are
registered under their own names, so the state dict uses the source's tensor names, plus, per MoE
layer M:

    M.router.weight (E, H)                     M.router.expert_bias (E,) float32, with aux_free_bias
    M.experts.{j}.{gate,up}_proj.weight (I, H) M.experts.{j}.down_proj.weight (H, I)   (+ .bias with bias)
    M.shared_experts.{s}.*  (same, I_s)        M.output_bias (H,), with output_bias
"""

from __future__ import annotations

import itertools
import math
from enum import Enum
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import MoeCausalLMOutputWithPast
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from .configuration_moeify import MoeifyConfig


class MoeifyExpert(nn.Module):
    """One FFN: down(act(gate(x)) * up(x)), or down(act(up(x))) when not gated. x: (T, H) -> (T, H)."""

    def __init__(self, hidden: int, intermediate: int, act: str, gated: bool, bias: bool):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=bias) if gated else None
        self.up_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)
        self.act_fn = ACT2FN[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_proj is None:
            return self.down_proj(self.act_fn(self.up_proj(x)))
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class MoeifyRouter(nn.Linear):
    """Router logits (T, E) = x (T, H) @ weight.T, weight (E, H).

    With aux-free balancing it also holds `expert_bias` (E,) float32, added to the scores for top-k
    selection only (never to the mixing weights) and moved outside the gradient.
    """

    def __init__(self, hidden: int, num_experts: int, aux_free_bias: bool):
        super().__init__(hidden, num_experts, bias=False)
        if aux_free_bias:
            self.register_buffer("expert_bias", torch.zeros(num_experts, dtype=torch.float32))
        else:
            self.expert_bias = None


class Routing:
    """Which experts each token uses and with what weight.

    logits (T, E) raw router output; index (T, k) chosen experts; weight (T, k) mixing weights
    (float32); keep (T, k) bool, False where capacity dropped the assignment.
    """

    def __init__(self, logits: torch.Tensor, index: torch.Tensor, weight: torch.Tensor, keep: torch.Tensor | None):
        self.logits, self.index, self.weight, self.keep = logits, index, weight, keep

    def mixing(self, dtype: torch.dtype) -> torch.Tensor:
        """(T, k) mixing weights in dtype, 0 where capacity dropped the assignment."""
        weight = self.weight.to(dtype)
        return weight if self.keep is None else weight * self.keep


class Kernel(Enum):
    """How a block computes its routed experts; every kernel equals the module path up to float rounding.

    Chosen per call by MoeifyBlock.plan from measurements on CPU (benchmarks/forward.py --kernels).
    """

    MODULE = "module"  # each expert's own modules on its sorted tokens: wrappers (LoRA), hooks, autocast
    GROUPED = "grouped"  # tokens sorted by expert through stacked weights: torch grouped matmul (or a loop)
    GATHER = "gather"  # each token through its chosen experts' weights, gathered: one token (decoding)
    MASKED = "masked"  # all experts as one dense FFN, a token's hidden units weighted 0 for unchosen experts


class ExpertStacks(NamedTuple):
    """The routed experts' weights stacked, each expert's width I zero-padded to `width` W.

    w_in (E, R*W, H): the R in-projections (gate then up, or up alone), rows [r*W, r*W + I) real;
    w_out (E, W, H): down_proj.weight transposed, rows [0, I) real; b_in (E, R*W), b_out (E, H) or None.
    Padding rows are zero, so padded hidden units contribute nothing.
    """

    w_in: torch.Tensor
    b_in: torch.Tensor | None
    w_out: torch.Tensor
    b_out: torch.Tensor | None
    width: int


class MoeifyBlock(nn.Module):
    """Routed experts behind a top-k router, plus always-on shared experts and an optional output bias.

    forward: (B, S, H) -> (B, S, H). Per-expert work is batched: assignments are sorted by expert
    and each expert that received tokens runs once on its contiguous slice.
    """

    def __init__(self, moe: dict, hidden: int):
        super().__init__()
        self.moe = moe
        self.top_k = moe["num_experts_per_tok"]
        self.num_experts = moe["num_experts"]
        shared_size = moe["shared_intermediate_size"] or moe["expert_intermediate_size"]
        expert = (moe["hidden_act"], moe["gated"], moe["bias"])
        self.router = MoeifyRouter(hidden, self.num_experts, moe["aux_free_bias"])
        self.experts = nn.ModuleList(
            MoeifyExpert(hidden, moe["expert_intermediate_size"], *expert) for _ in range(self.num_experts)
        )
        self.shared_experts = nn.ModuleList(
            MoeifyExpert(hidden, shared_size, *expert) for _ in range(moe["num_shared_experts"])
        )
        self.output_bias = nn.Parameter(torch.zeros(hidden)) if moe["output_bias"] else None
        self.sink: list | None = None  # set by MoeifyForCausalLM while router outputs are wanted
        self.pending_load: torch.Tensor | None = None  # (E,) expert load of the last training forward
        self._packed: tuple | None = None  # stacked expert weights for inference (see packed())
        self._packed_pointers: tuple = ()  # where the experts' parameters lived when last packed
        self._packable_key: tuple | None = None  # what packable() last checked, and its answer
        self._packable = False
        self._sample: tuple | None = None  # sample() after the last check of every expert without autograd
        self.kernel: Kernel | None = None  # forced for every call that can stack (tests, benchmarks); None: plan()
        self.register_state_dict_post_hook(contiguous_down_weights)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        routing = self.route(x)
        if self.sink is not None:
            self.sink.append(routing)
        out = self.dispatch(x, routing)
        for shared in self.shared_experts:
            out = out + shared(x)
        if self.output_bias is not None:
            out = out + self.output_bias
        return out.reshape(shape)

    def route(self, x: torch.Tensor) -> Routing:
        """Top-k experts per token of x (T, H), and their mixing weights."""
        moe = self.moe
        if self.training and moe["router_jitter_noise"] > 0:  # Switch-style: the router's input only
            noise = moe["router_jitter_noise"]
            x = x * torch.empty_like(x).uniform_(1.0 - noise, 1.0 + noise)
        logits = F.linear(x, self.router.weight)
        probs = logits.float().softmax(dim=-1)
        scores = probs if self.router.expert_bias is None else probs + self.router.expert_bias.float()
        # Unsorted top-k is 4x faster at E=256, k=128; only capacity dropping needs the choices in order.
        ordered = bool(self.training and moe["capacity_factor"])
        index = scores.topk(self.top_k, dim=-1, sorted=ordered).indices
        weight = probs.gather(1, index)
        if moe["scoring"] == "unit":  # weight 1 forward, d(weight)/d(p) = 1/p backward: the router still learns
            weight = weight / weight.detach()
        elif moe["norm_topk_prob"]:
            weight = weight / weight.sum(dim=-1, keepdim=True)
        keep = self.capacity_mask(index) if self.training and moe["capacity_factor"] else None
        if self.training and self.router.expert_bias is not None:
            # Overwritten, not accumulated: a checkpointed layer's recomputation writes the same load.
            self.pending_load = torch.bincount(index.reshape(-1).detach(), minlength=self.num_experts)
        return Routing(logits, index, weight, keep)

    def capacity_mask(self, index: torch.Tensor) -> torch.Tensor:
        """(T, k) bool: an expert takes at most ceil(factor * T * k / E) assignments.

        First choices of all tokens come before second choices (then token order), as in Switch
        Transformer, so a dropped assignment is the least preferred one.
        """
        tokens, k = index.shape
        capacity = math.ceil(self.moe["capacity_factor"] * tokens * k / self.num_experts)
        choice_major = index.t().reshape(-1)
        order = choice_major.argsort(stable=True)
        counts = torch.bincount(choice_major, minlength=self.num_experts)
        starts = counts.cumsum(0) - counts
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.numel(), device=index.device) - starts[choice_major[order]]
        return (rank < capacity).reshape(k, tokens).t()

    @torch.no_grad()
    def update_bias(self) -> None:
        """DeepSeek-V3 aux-loss-free balancing, from the last training forward's load: under-loaded
        experts' bias up, over-loaded ones down, by aux_free_update_rate.

        MoeifyForCausalLM calls it before the next training forward (and on eval()), not at the end
        of the forward itself: a layer under activation checkpointing is recomputed during backward
        and must route exactly as it first did.
        """
        if self.pending_load is None:
            return
        load = self.pending_load.float()
        self.router.expert_bias += self.moe["aux_free_update_rate"] * torch.sign(load.mean() - load)
        self.pending_load = None

    def dispatch(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """Sum over each token's kept experts of weight * expert(x). x: (T, H) -> (T, H), by plan()'s kernel."""
        kernel = self.plan(x)
        if kernel is Kernel.MODULE or kernel is Kernel.GROUPED:
            return self.sorted_dispatch(x, routing, kernel)
        expert_kernel = masked_experts if kernel is Kernel.MASKED else gathered_experts
        return expert_kernel(x, routing, self.stacks(), self.experts[0].act_fn, self.gated())

    def plan(self, x: torch.Tensor) -> Kernel:
        """The kernel for this call: self.kernel when set, otherwise the fastest measured one.

        Measured on CPU, float32, SmolLM2 shapes (hidden 576, 1536 neurons cut into E experts):
        one token reads least by gathering its experts' weights; many tokens are fastest as one
        dense masked FFN when experts are fine (see fine_grained), else as grouped products.
        Under autograd the masked FFN for fine experts (12x the module path's speed at E=256),
        otherwise the modules: grouped_mm's CPU backward is no faster than them.
        """
        if not self.ready(x):
            return Kernel.MODULE
        if self.kernel is not None:
            return self.kernel
        fine = self.fine_grained()
        if torch.is_grad_enabled():
            return Kernel.MASKED if fine else Kernel.MODULE
        if x.shape[0] == 1:
            return Kernel.GATHER
        return Kernel.MASKED if fine else Kernel.GROUPED

    def fine_grained(self) -> bool:
        """Whether computing every expert densely beats grouped products over the chosen ones.

        On CPU a grouped product over experts of width I runs at about I / (I + 110) of a dense
        product's speed (measured: 512 tokens, I from 6 to 384, 1/8 to 1/2 active), so the dense
        pass wins once the active share k/E reaches that: at 50 % active, below 110 neurons.
        """
        width = self.moe["expert_intermediate_size"]
        return self.top_k * (width + GROUPED_WIDTH_COST) >= self.num_experts * width

    def gated(self) -> bool:
        return self.experts[0].gate_proj is not None

    def sorted_dispatch(self, x: torch.Tensor, routing: Routing, kernel: Kernel) -> torch.Tensor:
        """dispatch with assignments sorted by expert: each projection runs once per expert (or once
        for all, grouped) on its contiguous rows and the activation once over all rows.
        """
        flat_expert = routing.index.reshape(-1)
        if routing.keep is None:
            order = flat_expert.argsort(stable=True)
            counts = torch.bincount(flat_expert, minlength=self.num_experts).tolist()  # one host sync
        else:
            slot = routing.keep.reshape(-1).nonzero().squeeze(-1)
            order = slot[flat_expert[slot].argsort(stable=True)]
            counts = torch.bincount(flat_expert[order], minlength=self.num_experts).tolist()
        inputs = x[order // self.top_k]
        if kernel is Kernel.GROUPED:
            out = grouped_rows(inputs, counts, self.stacks(), self.experts[0].act_fn, self.gated())
        else:
            out = self.module_rows(inputs, counts)
        weight = routing.weight.reshape(-1)[order].unsqueeze(-1).to(x.dtype)
        out = out * weight if torch.is_grad_enabled() else out.mul_(weight)
        if routing.keep is not None:  # one zero row past the end: every dropped assignment reads it
            out = torch.cat([out, out.new_zeros(1, out.shape[-1])])
        # Back to (token, choice) order by a gather and a sum over the k choices: cheaper on CPU
        # than a scatter-add, and deterministic.
        if routing.keep is None:
            back = order.argsort()
        else:
            back = torch.full_like(flat_expert, order.numel())
            back[order] = torch.arange(order.numel(), device=x.device)
        return out[back].view(-1, self.top_k, x.shape[-1]).sum(dim=1)

    def module_rows(self, inputs: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Sorted rows (S, H) through their experts' modules (autograd, LoRA, quantized layers): (S, H)."""
        bounds = [0, *itertools.accumulate(counts)]
        spans = [(j, bounds[j], bounds[j + 1]) for j, count in enumerate(counts) if count]

        def linear(role: str, x: torch.Tensor) -> torch.Tensor:
            parts = [getattr(self.experts[j], role)(x[a:b]) for j, a, b in spans]
            return torch.cat(parts) if parts else x.new_zeros(0, getattr(self.experts[0], role).out_features)

        act = self.experts[0].act_fn
        up = linear("up_proj", inputs)
        hidden = act(up) if not self.gated() else act(linear("gate_proj", inputs)) * up
        return linear("down_proj", hidden)

    def ready(self, x: torch.Tensor) -> bool:
        """Whether the experts can run from stacks (packable), which without autograd are packed and current.

        Checking every expert costs O(E) Python per call: 5x the kernel itself for one token at E=256.
        So a single token without autograd (decoding) checks a sample, the first and last experts'
        projections and where their weights live, which whole-model changes (.to, LoRA, quantizers,
        offloading, sharding) all touch; every other call checks every expert. Change one expert's
        parameter object or storage in the middle of one-token calls, and the next call of more
        tokens (or .to(), load_state_dict) notices it.
        """
        grad = torch.is_grad_enabled()
        if x.shape[0] == 1 and not grad and self._sample is not None and self._sample == self.sample(x):
            return self._packable
        if not self.packable(x):
            self._sample = None if grad else self.sample(x)
            return False
        if not grad:
            self.packed()  # repacks if a parameter moved
            self._sample = self.sample(x)
        return True

    def sample(self, x: torch.Tensor) -> tuple:
        """x's dtype and device, the first and last experts' submodules and their weights' addresses."""
        experts = self.experts._modules
        modules = [*experts["0"]._modules.values(), *experts[str(len(experts) - 1)]._modules.values()]
        weights = [getattr(m, "weight", None) for m in modules]
        return x.dtype, x.device, *modules, *(w.data_ptr() if isinstance(w, torch.Tensor) else None for w in weights)

    def packable(self, x: torch.Tensor) -> bool:
        """Plain nn.Linear experts in x's dtype and device (no autocast, wrappers or offload hooks):
        their weights can be stacked, with or without autograd."""
        if torch.is_autocast_enabled(x.device.type):
            return False
        linears = self.linears()
        key = (tuple(map(id, linears)), x.dtype, x.device)  # a wrapped (LoRA) layer is a new object
        if self._packable_key != key:
            self._packable_key = key
            self._packable = all(
                type(m) is nn.Linear and "_hf_hook" not in m.__dict__ and m.weight.dtype == x.dtype
                and m.weight.device == x.device for m in linears
            )
        return self._packable

    def linears(self) -> list[nn.Module]:
        """The experts' projections. Reads the module dicts directly: this runs on every call, and
        nn.Module attribute lookups are slow enough to show in one-token decoding."""
        roles = ("gate_proj", "up_proj", "down_proj")
        return [m for e in self.experts._modules.values() for r in roles if (m := e._modules.get(r)) is not None]

    def parameter_pointers(self) -> tuple:
        return tuple(p.data_ptr() for m in self.linears() for p in m._parameters.values() if p is not None)

    def stacks(self) -> ExpertStacks:
        """The experts' weights stacked: the packed stacks, or under autograd fresh differentiable ones."""
        if torch.is_grad_enabled():
            return stack_experts(list(self.experts), self.stack_width(self.experts[0].up_proj.weight.dtype))
        return self._packed if self._packed is not None else self.packed()  # ready() checked them

    def stack_width(self, dtype: torch.dtype) -> int:
        """Expert width in the stacks: padded to grouped_mm's 16-byte rows where grouped products run."""
        width = self.moe["expert_intermediate_size"]
        if GROUPED_MM is None or dtype not in GROUPED_MM_DTYPES or self.fine_grained():
            return width  # the dense masked FFN would only compute the padding
        step = 16 // dtype.itemsize
        return -(-width // step) * step

    def packed(self) -> ExpertStacks:
        """The experts' weights stacked (see ExpertStacks), for computing without autograd.

        Packed once and reused while every expert parameter still lives in the stacks; .to() and
        friends drop them (see _apply) and anything else giving a parameter new storage triggers
        a repack.
        """
        if self._packed is None or self._packed_pointers != self.parameter_pointers():
            self._packed = None  # let the old stacks go before building new ones
            self._packed = self.pack()
            self._packed_pointers = self.parameter_pointers()
        return self._packed

    def _apply(self, fn, *args, **kwargs):
        self._packed = None  # parameters get new storage: the stacks would only hold memory
        self._packable_key = self._sample = None  # and maybe a new dtype or device
        return super()._apply(fn, *args, **kwargs)

    @torch.no_grad()
    def pack(self) -> ExpertStacks:
        """Stack the experts' weights and make each parameter a view of its stack.

        The parameter objects stay the same (optimizers and tying keep working) and memory does not
        double: the old per-expert storages are freed. A down_proj.weight becomes a transposed
        view (the stack holds it as (W, H) rows) and save_pretrained writes it contiguous, under
        its own name. Built outside inference mode so the parameters can still be trained.
        """
        with torch.inference_mode(False):
            stacks = stack_experts(list(self.experts), self.stack_width(self.experts[0].up_proj.weight.dtype))
            width, roles = stacks.width, ("gate_proj", "up_proj") if self.gated() else ("up_proj",)
            for j, expert in enumerate(self.experts):
                for r, role in enumerate(roles):
                    linear = getattr(expert, role)
                    rows = slice(r * width, r * width + linear.out_features)
                    linear.weight.data = stacks.w_in[j, rows]
                    if stacks.b_in is not None:
                        linear.bias.data = stacks.b_in[j, rows]
                expert.down_proj.weight.data = stacks.w_out[j, : expert.down_proj.in_features].t()
                if stacks.b_out is not None:
                    expert.down_proj.bias.data = stacks.b_out[j]
        return stacks


GROUPED_MM = getattr(F, "grouped_mm", None)  # torch >= 2.10 (CPU kernel included)
GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
GROUPED_WIDTH_COST = 110  # neurons; see MoeifyBlock.fine_grained


def contiguous_down_weights(block: MoeifyBlock, state: dict, prefix: str, local_metadata: dict) -> None:
    """State-dict hook: each packed down_proj.weight (a transposed view of its stack) as a contiguous
    copy, as transformers' save_pretrained and safetensors need. Parameters (keep_vars) stay as they are."""
    for j in range(block.num_experts):
        name = f"{prefix}experts.{j}.down_proj.weight"
        tensor = state.get(name)
        if tensor is not None and not isinstance(tensor, nn.Parameter) and not tensor.is_contiguous():
            state[name] = tensor.contiguous()


def stack_experts(experts: list[MoeifyExpert], width: int) -> ExpertStacks:
    """The experts' weights stacked and zero-padded to `width` (differentiable under autograd)."""
    first = experts[0]
    roles = ("gate_proj", "up_proj") if first.gate_proj is not None else ("up_proj",)
    pad = width - first.up_proj.out_features

    def stacked(tensors: list[torch.Tensor]) -> torch.Tensor:  # (E, I, ...) padded to (E, W, ...)
        out = torch.stack(tensors)
        return F.pad(out, (0, 0, 0, pad) if out.dim() == 3 else (0, pad)) if pad else out

    w_in = torch.cat([stacked([getattr(e, role).weight for e in experts]) for role in roles], dim=1)
    w_out = stacked([e.down_proj.weight.t() for e in experts])
    if first.up_proj.bias is None:
        return ExpertStacks(w_in, None, w_out, None, width)
    b_in = torch.cat([stacked([getattr(e, role).bias for e in experts]) for role in roles], dim=1)
    return ExpertStacks(w_in, b_in, w_out, torch.stack([e.down_proj.bias for e in experts]), width)


def hidden_units(mid: torch.Tensor, act: nn.Module, gated: bool) -> torch.Tensor:
    """act(gate) * up, or act(up): mid (..., R, W) -> (..., W)."""
    if not gated:
        return act(mid[..., 0, :])
    gate = act(mid[..., 0, :])
    return gate * mid[..., 1, :] if torch.is_grad_enabled() else gate.mul_(mid[..., 1, :])


def grouped_rows(inputs: torch.Tensor, counts: list[int], stacks: ExpertStacks, act: nn.Module,
                 gated: bool) -> torch.Tensor:
    """Rows (S, H) sorted by expert, counts[j] for expert j, through their experts: (S, H)."""
    mid = grouped_product(inputs, stacks.w_in, stacks.b_in, counts)
    hidden = hidden_units(mid.view(mid.shape[0], -1, stacks.width), act, gated)
    return grouped_product(hidden, stacks.w_out.transpose(1, 2), stacks.b_out, counts)


def masked_experts(x: torch.Tensor, routing: Routing, stacks: ExpertStacks, act: nn.Module,
                   gated: bool) -> torch.Tensor:
    """Every expert on every token as one dense FFN of E*W neurons, each token's hidden units of
    expert e scaled by its mixing weight for e (0 when not chosen). x (T, H) -> (T, H).

    Exact, as the weighted sum of experts is linear in each expert's hidden units; it computes all
    experts, so it pays where the active share is high and experts are too small to group well.
    """
    tokens, experts = x.shape[0], stacks.w_in.shape[0]
    b_in = None if stacks.b_in is None else stacks.b_in.flatten()
    mid = F.linear(x, stacks.w_in.flatten(0, 1), b_in).view(tokens, experts, -1, stacks.width)
    mixing = x.new_zeros(tokens, experts).scatter(1, routing.index, routing.mixing(x.dtype))  # (T, E)
    hidden = hidden_units(mid, act, gated)  # (T, E, W)
    hidden = hidden * mixing.unsqueeze(-1) if torch.is_grad_enabled() else hidden.mul_(mixing.unsqueeze(-1))
    out = hidden.flatten(1) @ stacks.w_out.flatten(0, 1)
    return out if stacks.b_out is None else out + mixing @ stacks.b_out


def gathered_experts(x: torch.Tensor, routing: Routing, stacks: ExpertStacks, act: nn.Module,
                     gated: bool) -> torch.Tensor:
    """Each token through its k chosen experts, whose stacked weights are gathered first: reads only
    the chosen weights, which pays for one token (decoding). x (T, H) -> (T, H)."""
    (tokens, k), hidden_size = routing.index.shape, x.shape[1]
    chosen = routing.index.reshape(-1)
    w_in = stacks.w_in.index_select(0, chosen).view(tokens, -1, hidden_size)  # (T, k*R*W, H)
    mid = torch.bmm(w_in, x.unsqueeze(-1)).view(tokens, k, -1, stacks.width)
    if stacks.b_in is not None:
        mid = mid + stacks.b_in.index_select(0, chosen).view(mid.shape)
    weight = routing.mixing(x.dtype).unsqueeze(-1)  # (T, k, 1)
    hidden = hidden_units(mid, act, gated)  # (T, k, W)
    hidden = hidden * weight if torch.is_grad_enabled() else hidden.mul_(weight)
    w_out = stacks.w_out.index_select(0, chosen).view(tokens, -1, hidden_size)  # (T, k*W, H)
    out = torch.bmm(hidden.reshape(tokens, 1, -1), w_out).squeeze(1)
    if stacks.b_out is not None:
        out = out + (weight * stacks.b_out.index_select(0, chosen).view(tokens, k, hidden_size)).sum(1)
    return out


def _aligned(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """grouped_mm wants every row stride a multiple of 16 bytes (e.g. float32 widths divisible by 4)."""
    return all(size * x.element_size() % 16 == 0 for size in (x.shape[1], weight.shape[1]))


def grouped_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, counts: list[int]):
    """x (S, in) sorted by expert, counts[j] rows for expert j; weight (E, out, in), bias (E, out): (S, out)."""
    if GROUPED_MM is not None and x.dtype in GROUPED_MM_DTYPES and x.shape[0] > 0 and _aligned(x, weight):
        ends = torch.tensor(counts, dtype=torch.int32, device=x.device).cumsum(0, dtype=torch.int32)
        out = GROUPED_MM(x, weight.transpose(1, 2), offs=ends)
        if bias is not None:
            out = out + bias.repeat_interleave(torch.tensor(counts, device=x.device), dim=0)
        return out
    if torch.is_grad_enabled():  # out= products do not record autograd
        bounds = [0, *itertools.accumulate(counts)]
        parts = [F.linear(x[bounds[j]:bounds[j + 1]], weight[j], None if bias is None else bias[j])
                 for j in range(len(counts))]
        return torch.cat(parts)
    out, start = x.new_empty(x.shape[0], weight.shape[1]), 0
    for j, count in enumerate(counts):
        if count:
            rows = slice(start, start + count)
            if bias is None:
                torch.mm(x[rows], weight[j].t(), out=out[rows])
            else:
                torch.addmm(bias[j], x[rows], weight[j].t(), out=out[rows])
            start += count
    return out


class PeerBlock(nn.Module):
    """A PEER layer ("Mixture of A Million Experts"): every expert is one neuron, found by product keys.

    Neurons sit on an n x n grid of slots (slot = row * n + column). Layer M holds, with S = n² slots:

        M.up_rows, M.down_rows (S, H); M.gate_rows (S, H), when gated; M.gate_bias, M.up_bias (S,), with bias
        M.query.weight (heads * d, H); M.sub_keys (heads, 2, n, d / 2); M.query_norm.*, with query_norm
        M.shared.{gate,up,down}_proj.* (the always-on neurons, one dense FFN); M.output_bias (H,)

    Neuron s adds w_s * act(gate_s·x + b) * (up_s·x + b) * down_s (act(up_s·x + b) * down_s when not
    gated). Each head scores slot (i, j) as q1·K1[i] + q2·K2[j], its query's two halves against its
    two sub-key tables, and keeps the top_k slots (by |score| with `magnitude`: a neuron matters
    when its input projection is far from zero on either side). The top (top_k + margin) rows and columns by
    their half-scores hold those slots, so only their pairwise sums are formed: nothing of size S
    per token. The S - num_neurons padding slots score -inf and are never chosen; no row or column
    holds more than `margin` of them (see padding), which is what the search widens by. Weights:
    softmax over each head's k scores, or unit (1 per distinct neuron, straight-through to the scores).
    """

    CHUNK = 2**22  # gathered row elements per chunk of tokens: bounds memory for any top_k

    def __init__(self, peer: dict, hidden: int):
        super().__init__()
        self.peer = peer
        n, d, heads = peer["num_sub_keys"], peer["key_dim"], peer["num_heads"]
        self.n, self.heads, self.top_k, self.half = n, heads, peer["num_neurons_per_head"], d // 2
        self.padding_count = n * n - peer["num_neurons"]
        self.margin = -(-self.padding_count // n)  # 0, 1 or 2: padding slots in any row or column, at most
        self.act_fn = ACT2FN[peer["hidden_act"]]
        self.query = nn.Linear(hidden, heads * d, bias=False)
        self.query_norm = nn.BatchNorm1d(heads * d) if peer["query_norm"] else None
        self.sub_keys = nn.Parameter(torch.randn(heads, 2, n, self.half) / math.sqrt(self.half))
        rows = lambda: nn.Parameter(torch.randn(n * n, hidden) / math.sqrt(hidden))  # noqa: E731
        self.gate_rows = rows() if peer["gated"] else None
        self.up_rows, self.down_rows = rows(), rows()
        self.gate_bias = nn.Parameter(torch.zeros(n * n)) if peer["bias"] and peer["gated"] else None
        self.up_bias = nn.Parameter(torch.zeros(n * n)) if peer["bias"] else None
        shared = peer["num_shared_neurons"]
        self.shared = MoeifyExpert(hidden, shared, peer["hidden_act"], peer["gated"], peer["bias"]) if shared else None
        self.output_bias = nn.Parameter(torch.zeros(hidden)) if peer["output_bias"] else None
        self._float32: dict[str, tuple[torch.Tensor, int, torch.Tensor]] = {}  # see float32

    def float32(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """weight in float32. Outside autograd a narrower weight's copy is kept until the weight changes
        (in place, or replaced): copying the queries and sub-keys on every call took most of a token's time."""
        if weight.dtype == torch.float32 or torch.is_grad_enabled():
            return weight.float()
        # The source is held, so an equal address is the same memory; its version counts in-place writes.
        source, version, copy = self._float32.get(name, (None, -1, None))
        if source is None or source.data_ptr() != weight.data_ptr() or version != weight._version:
            source, version, copy = self._float32[name] = (weight.detach(), weight._version, weight.float())
        return copy

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        slots, scores = self.retrieve(x)
        out = self.neuron_sum(x, slots.flatten(1), self.weights(slots, scores))
        if self.shared is not None:
            out = out + self.shared(x)
        if self.output_bias is not None:
            out = out + self.output_bias
        return out.reshape(shape)

    def retrieve(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each head's top_k slots for x (T, H): slots (T, heads, k) and their scores (T, heads, k) float32."""
        # In float32 whatever the weights' dtype: rankings are sensitive to rounding, the tensors are
        # small, and CPUs without bfloat16 units multiply float32 several times faster.
        q = F.linear(x.float(), self.float32("query", self.query.weight))
        if self.query_norm is not None:
            q = self.query_norm(q.to(self.query_norm.weight.dtype)).float()
        q = q.view(len(x), self.heads, 2, self.half)
        halves = torch.einsum("thpd,hpnd->thpn", q, self.float32("sub_keys", self.sub_keys))  # (T, heads, 2, n)
        slots, top = self.search(halves)
        if not self.peer["magnitude"]:
            return slots, top
        # The top_k by |score|: those >= 0 are among the top_k of the scores, the others among the
        # top_k of their negations; each side keeps its own sign, so no slot is counted twice.
        negated_slots, negated = self.search(-halves)
        scores = torch.cat([top.masked_fill(top < 0, -math.inf), negated.masked_fill(negated <= 0, -math.inf)], -1)
        top, pos = scores.topk(self.top_k, dim=-1)
        return torch.cat([slots, negated_slots], -1).gather(-1, pos), top

    def search(self, halves: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The top_k slots (T, heads, k) and scores of half-scores (T, heads, 2, n): products of each half's best."""
        best, index = halves.topk(min(self.top_k + self.margin, self.n), dim=-1)
        rows, cols = index[..., 0, :, None], index[..., 1, None, :]
        sums = best[..., 0, :, None] + best[..., 1, None, :]  # (T, heads, s, s)
        if self.padding_count:
            sums.masked_fill_(is_padding(rows, cols, self.n, self.padding_count), float("-inf"))
        top, pos = sums.flatten(-2).topk(self.top_k, dim=-1)
        return (rows * self.n + cols).flatten(-2).gather(-1, pos), top

    def weights(self, slots: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """(T, heads * k) float32 mixing weights of the retrieved slots (T, heads, k)."""
        if self.peer["scoring"] == "softmax":
            return scores.softmax(dim=-1).flatten(1)
        # exp(log p - log p) = 1 forward, d/dp = 1/p backward like MoeifyBlock's unit weights, and no
        # 0/0 where a softmax over many scores underflows.
        log_probs = scores.log_softmax(dim=-1).flatten(1)
        weight = (log_probs - log_probs.detach()).exp()
        if self.heads > 1:  # a neuron found by several heads counts once: the chosen set's partial sum
            weight = weight * first_occurrence(slots.flatten(1))
        return weight

    def neuron_sum(self, x: torch.Tensor, slots: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x (T, H), slots and weight (T, m) -> (T, H): sum over m of weight * neuron(x), a chunk of tokens at a time."""
        step = max(1, self.CHUNK // (slots.shape[1] * x.shape[1]))
        parts = [self.chosen(x[a:a + step], slots[a:a + step], weight[a:a + step]) for a in range(0, len(x), step)]
        return torch.cat(parts) if parts else x.new_zeros(0, x.shape[1])

    def chosen(self, x: torch.Tensor, slots: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x (t, H), slots and weight (t, m) -> (t, H). Rows are gathered as embeddings, so gradients
        reach only the rows a token used (dense gradient tensors, zero elsewhere)."""
        def project(rows: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:  # (t, m)
            out = torch.bmm(F.embedding(slots, rows), x.unsqueeze(-1)).squeeze(-1)
            return out if bias is None else out + bias[slots]

        up = project(self.up_rows, self.up_bias)
        mid = self.act_fn(up) if self.gate_rows is None else self.act_fn(project(self.gate_rows, self.gate_bias)) * up
        # The weighted sum of down rows in one kernel, never the (t, m, H) gathered rows: many times
        # faster than their product, which CPUs compute slowly in bfloat16.
        return F.embedding_bag(slots, self.down_rows, per_sample_weights=mid * weight.to(mid.dtype), mode="sum")


def is_padding(rows: torch.Tensor, cols: torch.Tensor, n: int, count: int) -> torch.Tensor:
    """Whether grid cells (rows, cols) are among the `count` padding slots of an n x n grid.

    Padding cell t is (t mod n, (t + t div n) mod n): the diagonal, then the one just above it
    (count < 2n - 1 when n is the smallest side that fits the neurons), so no row or column holds
    more than two, and a search widened by that many per half stays exact. Row r's padding columns
    are worked out on rows alone (r, or -1 for none; r + 1, or -1), so a search's (s, s) candidate
    grid costs two comparisons.
    """
    diagonal = torch.where(rows < count, rows, -1)
    above = torch.where(rows < count - n, rows + 1, -1)
    return (cols == diagonal) | (cols == above)


def first_occurrence(index: torch.Tensor) -> torch.Tensor:
    """(T, m) float32: 1 where a value first appears in its row of index (T, m), 0 where it repeats."""
    ordered, order = index.sort(dim=-1, stable=True)
    first = torch.ones(ordered.shape, dtype=torch.float32, device=index.device)
    first[:, 1:] = (ordered[:, 1:] != ordered[:, :-1]).float()
    return torch.empty_like(first).scatter_(-1, order, first)


def dense_class(base_config) -> type[PreTrainedModel]:
    """The family's own *ForCausalLM class for a base config."""
    return MODEL_FOR_CAUSAL_LM_MAPPING[type(base_config)]


def check_ffn(model: nn.Module, path: str) -> None:
    """Refuse a moe.mlp_path that does not name a feed-forward block, at construction.

    Swapping an attention, a norm, a single projection or a whole decoder layer for experts would
    load (their weights are simply unused) and compute something else. A family's FFN holds its
    in and out projections (nn.Linear, or gpt2's Conv1D: 2-D weights) and an activation, nothing
    nested, and no attention.
    """
    try:
        module = model.get_submodule(path)
    except AttributeError:
        raise ValueError(f"moe.mlp_path names {path}, which this {type(model).__name__} does not have") from None
    kind = type(module).__name__
    attention = next((type(m).__name__ for m in module.modules() if "attention" in type(m).__name__.lower()), None)
    if attention:
        what = "attention" if attention == kind else f"holding attention ({attention})"
        raise ValueError(f"moe.mlp_path names {path}, a {kind}: {what}, not the layer's feed-forward block (its MLP)")
    children = list(module.children())
    projections = [c for c in children if isinstance(getattr(c, "weight", None), torch.Tensor) and c.weight.dim() == 2]
    if len(projections) < 2 or any(next(c.children(), None) is not None for c in children):
        raise ValueError(f"moe.mlp_path names {path}, a {kind}: not a feed-forward block (in and out "
                         f"projections, nothing nested), which the layer's MLP is")


class MoeifyPreTrainedModel(PreTrainedModel):
    config_class = MoeifyConfig
    supports_gradient_checkpointing = True
    # The attention is the family's own; every supported family implements these backends.
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True


class MoeifyForCausalLM(MoeifyPreTrainedModel, GenerationMixin):
    """The source family's causal LM with MoE blocks in place of the chosen FFNs."""

    # Copied from the family's class so loading, tying and device maps treat the model as the family's.
    _ADOPTED = (
        "_tied_weights_keys",
        "_keys_to_ignore_on_load_unexpected",
        "_keys_to_ignore_on_load_missing",
        "_keep_in_fp32_modules",
        "_keep_in_fp32_modules_strict",
        "_no_split_modules",
    )

    def __init__(self, config: MoeifyConfig):
        super().__init__(config)
        dense = dense_class(config.base_config)(config.base_config)
        # The dense model is kept unregistered: its modules are registered on self under their own
        # names (so tensor names are the source's), and its forward is reused as is.
        self.__dict__["dense"] = dense
        for name in self._ADOPTED:
            setattr(self, name, getattr(type(dense), name, None))
        hidden = config.base_config.hidden_size
        blocks = []
        for layer in config.moe["moe_layers"]:
            path = config.mlp_path(layer)
            check_ffn(dense, path)
            parent, _, leaf = path.rpartition(".")
            blocks.append(MoeifyBlock(config.moe, hidden))
            setattr(dense.get_submodule(parent), leaf, blocks[-1])
        for layer in config.peer["peer_layers"] if config.peer else ():  # PEER layers: their own block
            path = config.peer["mlp_path"].replace("{i}", str(layer))
            check_ffn(dense, path)
            parent, _, leaf = path.rpartition(".")
            setattr(dense.get_submodule(parent), leaf, PeerBlock(config.peer, hidden))
        self.__dict__["moe_blocks"] = blocks  # a plain list (not registered twice); walking modules per call is slow
        self._adopt()
        self.post_init()

    def _adopt(self) -> None:
        """Register the dense model's top-level modules on self (again, after one was replaced)."""
        for name, module in self.dense.named_children():
            self.add_module(name, module)

    def blocks(self) -> list[MoeifyBlock]:
        return self.moe_blocks

    def get_input_embeddings(self) -> nn.Module:
        return self.dense.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.dense.set_input_embeddings(value)
        self._adopt()

    def get_output_embeddings(self) -> nn.Module | None:
        return self.dense.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.dense.set_output_embeddings(value)
        self._adopt()

    def train(self, mode: bool = True):
        if not mode:
            self.update_bias()  # the last training step's balancing update is not lost
        self.dense.training = mode  # its own flag: children follow through self
        return super().train(mode)

    def update_bias(self) -> None:
        """Apply the pending aux-free balancing update of every MoE block (see MoeifyBlock.update_bias)."""
        for block in self.blocks():
            block.update_bias()

    def prepare_inputs_for_generation(self, *args, **kwargs):
        return self.dense.prepare_inputs_for_generation(*args, **kwargs)

    def adjust_generation_fn(self, *args, **kwargs):
        # Without generation_config.json, transformers reads token ids from config.json's top level,
        # where a hand-written moeify config need not have them: take the family's.
        super().adjust_generation_fn(*args, **kwargs)
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if getattr(self.generation_config, name, None) is None:
                setattr(self.generation_config, name, getattr(self.config.base_config, name, None))

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        output_router_logits: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> MoeCausalLMOutputWithPast | tuple:
        """The dense family's forward; with output_router_logits, also router_logits and aux_loss.

        With labels the loss is the family's LM loss + router_aux_loss_coef * aux_loss (when router
        outputs are requested) + router_z_loss_coef * z_loss (when that coefficient is set).
        """
        moe = self.config.moe
        if self.training:
            self.update_bias()
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        z_loss_wanted = labels is not None and moe["router_z_loss_coef"] > 0
        sink = [] if output_router_logits or z_loss_wanted else None
        blocks = self.blocks()
        for block in blocks:
            block.sink = sink
        if logits_to_keep:
            kwargs["logits_to_keep"] = logits_to_keep
        try:
            out = self.dense(input_ids=input_ids, attention_mask=attention_mask, labels=labels, return_dict=True,
                             **kwargs)
        finally:
            for block in blocks:
                block.sink = None
        loss, aux_loss = out.loss, None
        if output_router_logits and sink:
            aux_loss = load_balancing_loss(sink, self.config.moe["num_experts"], attention_mask)
            if loss is not None:
                loss = loss + moe["router_aux_loss_coef"] * aux_loss.to(loss.device)
        if z_loss_wanted and sink:
            loss = loss + moe["router_z_loss_coef"] * router_z_loss(sink, attention_mask).to(loss.device)
        result = MoeCausalLMOutputWithPast(
            loss=loss,
            aux_loss=aux_loss,
            logits=out.logits,
            cache=out.get("cache"),
            hidden_states=out.get("hidden_states"),
            attentions=out.get("attentions"),
            router_logits=tuple(r.logits for r in sink) if output_router_logits and sink else None,
        )
        if return_dict is False:
            return result.to_tuple()
        return result


def token_mask(attention_mask: torch.Tensor | None, tokens: int, device: torch.device) -> torch.Tensor:
    """(T,) float32 weights: 1 for real tokens, 0 for padding (all ones without a 2-D mask)."""
    if attention_mask is None or attention_mask.dim() != 2 or attention_mask.numel() != tokens:
        return torch.ones(tokens, device=device)
    return attention_mask.reshape(-1).to(device=device, dtype=torch.float32)


def load_balancing_loss(routings: list[Routing], num_experts: int, attention_mask=None) -> torch.Tensor:
    """Switch/Mixtral aux loss, averaged over MoE layers: E * sum_i f_i * P_i.

    f_i: share of the (T*k) assignments that went to expert i, times k (as Mixtral counts it);
    P_i: mean router probability of expert i. Both over real (unpadded) tokens. Equals k when
    perfectly balanced, and grows as routing concentrates.
    """
    losses = []
    for r in routings:
        mask = token_mask(attention_mask, r.logits.shape[0], r.logits.device)
        total = mask.sum().clamp(min=1)
        probs = r.logits.float().softmax(dim=-1)
        counts = torch.zeros(num_experts, device=probs.device).index_add_(
            0, r.index.reshape(-1), mask.repeat_interleave(r.index.shape[1])
        )
        share = counts / total
        mean_prob = (probs * mask.unsqueeze(-1)).sum(0) / total
        losses.append(num_experts * (share * mean_prob).sum())
    return torch.stack(losses).mean()


def router_z_loss(routings: list[Routing], attention_mask=None) -> torch.Tensor:
    """ST-MoE router z-loss: mean over real tokens of logsumexp(logits)^2, averaged over MoE layers."""
    losses = []
    for r in routings:
        mask = token_mask(attention_mask, r.logits.shape[0], r.logits.device)
        z = torch.logsumexp(r.logits.float(), dim=-1).square()
        losses.append((z * mask).sum() / mask.sum().clamp(min=1))
    return torch.stack(losses).mean()


__all__ = ["MoeifyBlock", "MoeifyForCausalLM", "MoeifyPreTrainedModel"]
