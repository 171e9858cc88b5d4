"""PEER conversion: a dense FFN as a layer of single-neuron experts found by product keys.

A dense FFN already is a set of single-neuron experts: neuron i adds act(g_i·x)·(u_i·x)·d_i to
the output. `moeify peer` keeps every neuron as an expert, laid out on an n x n grid of slots,
and adds what PEER needs to find a token's neurons cheaply: per head, a query projection and
two tables of n sub-keys, so that slot (r, c) scores x·a_r + x·b_c, with a_r = W1ᵀ K1[r] and
b_c = W2ᵀ K2[c] (see PeerBlock in the remote modeling code).

Retrieval without training. Calibration (calibration.LayerStats, the statistics split keeps)
gives each neuron its least-squares linear predictor w_i of the neuron's share of a token's
contribution mass: the per-neuron router split would fit. A product-key scorer can only say
w_i ≈ a_r(i) + b_c(i), so the neurons are placed on the grid to make that approximation good:
an additive quantisation (row vectors plus column vectors) in the metric of the calibration
inputs, where distance is score error on calibration tokens. The best row and column vectors
for the placement are then factored into query projections and sub-keys; further heads fit
what the previous ones missed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import ClassVar

import torch

from moeify.calibration import LayerStats
from moeify.errors import MoeifyError
from moeify.spec import Format, Mode, Partition, Retrieval, Spec, SplitRouter
from moeify.split import RIDGE
from moeify.targets.remote_code.modeling_moeify import PeerBlock, is_padding
from moeify.transforms import FFN, Scoring, generator

SWEEPS = 8  # placement refinements (each: rows within columns, then columns within rows)
# Rows retrieval adds each neuron's gate score at this share of its up score's rms: a neuron whose gate
# is shut (silu(g·x) near 0) matters little whatever its up score. SmolLM2-135M at 50 %, held-out
# perplexity by share: 0: x1.43, 0.05: x1.31, 0.1-0.25: x1.20-1.23, 0.5: x1.41, 1: x3.9.
GATE_SHARE = 0.125


@dataclass(frozen=True)
class PeerSpec(Spec):
    """A PEER conversion in Spec's terms: each FFN split into single neurons (granularity = its width,
    shared_experts of them always on), `topk` per retrieval head, plus the retrieval's own fields."""

    peer: ClassVar[bool] = True
    mode: Mode = Mode.SPLIT
    experts: int = 1
    format: Format = Format.REMOTE  # PEER layers exist only in moeify's remote format
    partition: Partition = Partition.CLUSTER  # neurons placed on the grid by clustering their predictors
    split_router: SplitRouter = SplitRouter.FIT
    heads: int = 1  # retrieval heads; a token uses the union of their top-k neurons
    key_dim: int | None = None  # query size per head; None: 2 * min(n, hidden), an exact factoring
    query_norm: bool = False  # BatchNorm on the queries (as in the PEER paper), identity at conversion
    scoring: Scoring = Scoring.UNIT  # unit: the chosen neurons' partial sum of the FFN
    retrieval: Retrieval = Retrieval.UP  # what the grid's scores approximate (calibrated conversions)

    def _validate(self) -> None:
        if isinstance(self.heads, bool) or not isinstance(self.heads, int) or self.heads < 1:
            raise MoeifyError(f"--heads must be a whole number, at least 1 (got {self.heads!r})")
        if self.format is not Format.REMOTE:
            raise MoeifyError("PEER layers exist only in moeify's remote format; drop --format")
        if self.retrieval is Retrieval.ROWS and (self.heads != 1 or self.key_dim is not None):
            raise MoeifyError("--retrieval rows sets its own heads (one or two per grid row) and key size; "
                              "drop --heads and --key-dim")
        if self.key_dim is not None and (isinstance(self.key_dim, bool) or not isinstance(self.key_dim, int)
                                         or self.key_dim < 2 or self.key_dim % 2):
            raise MoeifyError(f"--key-dim must be an even whole number >= 2 (got {self.key_dim!r})")
        if not 0 <= self.shared_experts < self.granularity:
            raise MoeifyError(f"--shared-neurons ({self.shared_experts}) must leave some of the "
                              f"{self.granularity} neurons routed")
        if not 1 <= self.topk <= self.routed_experts:
            raise MoeifyError(f"--topk must be between 1 and the {self.routed_experts} routed neurons, "
                              f"or all (got {self.topk})")
        super()._validate()

    @property
    def active_experts(self) -> int:
        if self.retrieval is Retrieval.ROWS:  # a quota per grid row, the same whether gated or not
            return min(grid_side(self.routed_experts) * row_topk(self, gated=False), self.routed_experts)
        return min(self.heads * self.topk, self.routed_experts)

    def needs_calibration(self) -> bool:
        """Whether retrieval has anything to learn: fewer than all neurons chosen, or neurons to share."""
        return self.topk < self.routed_experts or self.shared_experts > 0


def grid_side(neurons: int) -> int:
    """n, the smallest grid side with n² >= neurons (then fewer than 2n - 1 slots are padding)."""
    return math.isqrt(neurons - 1) + 1


def row_topk(spec: PeerSpec, gated: bool) -> int:
    """Neurons each head retrieves with rows retrieval: its row's quota of spec.topk, halved between
    the two heads (one per sign of the scores) a gated FFN's rows have; the whole row at full retrieval."""
    n = grid_side(spec.routed_experts)
    if spec.topk >= spec.routed_experts:
        return n
    per_sign = max(1, spec.topk // (2 * n))
    return per_sign if gated else 2 * per_sign


def valid_slots(neurons: int) -> torch.Tensor:
    """(neurons,) the slots of an n x n grid that are not padding, in increasing order."""
    n = grid_side(neurons)
    slots = torch.arange(n * n)
    return slots[~is_padding(slots // n, slots % n, n, n * n - neurons)]


# ---------------------------------------------------------------------------- the layer


@dataclass(frozen=True)
class PeerLayer:
    """One FFN as a PEER layer, in the shapes PeerBlock holds (S = n² slots, H hidden, d key size).

    neurons: the FFN with its neurons in slot order (up, gate (S, H); down (H, S); biases (S,)),
    padding slots zero and no down bias (it is output_bias). query (heads * d, H); sub_keys
    (heads, 2, n, d / 2); shared: the always-on neurons (no down bias); query_norm: BatchNorm
    tensors by name, or None.
    """

    neurons: FFN
    query: torch.Tensor
    sub_keys: torch.Tensor
    topk: int  # neurons each head retrieves
    heads: int
    num_neurons: int  # routed neurons on the grid; the other slots are padding
    shared: FFN | None = None
    output_bias: torch.Tensor | None = None
    query_norm: dict[str, torch.Tensor] | None = None
    magnitude: bool = False  # retrieve by |score|: up rows of a gated FFN matter on either side of zero

    @property
    def active(self) -> int:
        """Neurons a token's retrieval reaches at most: heads x top-k, at most all of them."""
        return min(self.heads * self.topk, self.num_neurons)

    @property
    def inactive_params(self) -> int:
        """What a token does not use, of the parameters conversion writes: the slots its retrieval
        leaves out (padding included). query_norm's running statistics are buffers, which
        conversion.plan does not count as parameters at all."""
        slots = self.neurons.intermediate_size
        per_slot = sum(t.numel() for t in self.neurons.tensors().values()) // slots  # no down bias here
        return (slots - self.active) * per_slot


@dataclass(frozen=True)
class PeerPlan:
    """What calibration decides for one FFN: shared neurons, where routed ones sit, and the retrieval."""

    shared: torch.Tensor  # (S_shared,) neuron indices, always on
    routed: torch.Tensor  # (N,) the other neurons
    slots: torch.Tensor  # (N,) grid slot of each routed neuron
    query: torch.Tensor  # (heads * d, H) float32
    sub_keys: torch.Tensor  # (heads, 2, n, d / 2) float32
    query_var: torch.Tensor | None  # (heads * d,) mean square of the queries on calibration text
    query_bias: torch.Tensor | None = None  # (heads * d,) query_norm's bias, which rows retrieval needs


def peer_ffn(ffn: FFN, spec: PeerSpec, layer: int, plan: PeerPlan | None = None) -> PeerLayer:
    """The transform: a dense FFN as a PEER layer (shapes only when ffn holds meta tensors).

    plan: from calibration when spec.needs_calibration(); otherwise neurons keep their order
    and the retrieval is random (seeded), which full retrieval makes irrelevant.
    """
    if plan is None or ffn.up.is_meta:
        plan = default_plan(ffn, spec, layer)
    slots_total = grid_side(len(plan.routed)) ** 2
    neurons = replace(ffn.map(lambda role, t: _in_slots(t, role, plan, slots_total)), down_bias=None)
    shared = None
    if len(plan.shared):  # one dense FFN; its down bias (zero) exists when the family has biases
        shared = ffn.neurons(plan.shared)
        shared = replace(shared, down_bias=None if ffn.down_bias is None else torch.zeros_like(ffn.down_bias))
    like = ffn.up
    gated = ffn.gate is not None
    return PeerLayer(neurons=neurons, query=plan.query.to(like.dtype), sub_keys=plan.sub_keys.to(like.dtype),
                     topk=row_topk(spec, gated) if spec.retrieval is Retrieval.ROWS else spec.topk,
                     heads=plan.sub_keys.shape[0], num_neurons=len(plan.routed), shared=shared,
                     output_bias=ffn.down_bias,
                     query_norm=_query_norm(plan, like) if spec.query_norm or plan.query_bias is not None else None,
                     magnitude=spec.retrieval is Retrieval.UP and gated)


def _in_slots(t: torch.Tensor, role: str, plan: PeerPlan, slots: int) -> torch.Tensor:
    """One FFN tensor with its routed neurons moved to their slots (padding slots zero)."""
    if role == "down_bias":
        return t
    if role == "down":
        out = t.new_zeros(t.shape[0], slots)
        if not t.is_meta:
            out[:, plan.slots] = t[:, plan.routed]
        return out
    out = t.new_zeros(slots, *t.shape[1:])
    if not t.is_meta:
        out[plan.slots] = t[plan.routed]
    return out


def _query_norm(plan: PeerPlan, like: torch.Tensor) -> dict[str, torch.Tensor]:
    """BatchNorm tensors that make it the identity in eval mode (and close to it in training):
    running statistics of the calibration queries, undone by the affine weight and bias."""
    var = plan.query_var if plan.query_var is not None else torch.ones(len(plan.query))
    if like.is_meta:
        var = var.to("meta")
    scale = (var + 1e-5).sqrt()  # BatchNorm1d's eps
    bias = torch.zeros_like(scale) if plan.query_bias is None else plan.query_bias.to(scale.device)
    return {"weight": scale.to(like.dtype), "bias": bias.to(like.dtype),
            "running_mean": torch.zeros_like(var, dtype=torch.float32), "running_var": var.float(),
            "num_batches_tracked": torch.zeros((), dtype=torch.long, device=var.device)}


def default_plan(ffn: FFN, spec: PeerSpec, layer: int) -> PeerPlan:
    """No calibration: neurons in order on the valid slots, shared ones first, random (seeded) retrieval."""
    if spec.retrieval is Retrieval.ROWS:
        return rows_plan(ffn, spec, None)
    S, I, H = spec.shared_experts, ffn.intermediate_size, ffn.hidden_size
    n = grid_side(I - S)
    d = key_dim(spec, n, H)
    gen = generator(spec.seed, layer, "peer")
    device = "meta" if ffn.up.is_meta else "cpu"
    query = torch.randn(spec.heads * d, H, generator=gen) / math.sqrt(H)
    sub_keys = torch.randn(spec.heads, 2, n, d // 2, generator=gen) / math.sqrt(d // 2)
    return PeerPlan(shared=torch.arange(S), routed=torch.arange(S, I), slots=valid_slots(I - S),
                    query=query.to(device), sub_keys=sub_keys.to(device), query_var=None)


def key_dim(spec: PeerSpec, n: int, hidden: int) -> int:
    """The query size per head: spec.key_dim, or twice the rank a row (or column) table can use."""
    return spec.key_dim or 2 * min(n, hidden)


# ---------------------------------------------------------------------------- calibrated retrieval


def plan_layer(ffn: FFN, spec: PeerSpec, layer: int, stats: LayerStats) -> PeerPlan:
    """Shared neurons, grid placement and retrieval of one FFN from its calibration statistics."""
    if spec.retrieval is Retrieval.ROWS:
        return rows_plan(ffn, spec, stats)
    shared, routed = shared_and_routed(ffn.intermediate_size, spec.shared_experts, stats)
    predictors = up_predictors(ffn, stats) if spec.retrieval is Retrieval.UP else fitted_predictors(stats)
    whiten = gram_root(stats)  # z = whiten @ w: distance between z's is score error on calibration tokens
    z = (whiten @ predictors[:, routed]).T.float()  # (N, H)
    n = grid_side(len(routed))
    slots = place(z, n, generator(spec.seed, layer, "peer"))
    tables = head_tables(z, slots, n, spec.heads)  # per head: rows (n, H), cols (n, H), in z space
    back = torch.linalg.inv(whiten).float()  # z space -> predictor space: a score is x · (back @ v)
    d = key_dim(spec, n, ffn.hidden_size)
    heads = [factor(rows @ back.T, cols @ back.T, d // 2) for rows, cols in tables]
    query = torch.cat([torch.cat([w1, w2]) for w1, _, w2, _ in heads])  # (heads * d, H)
    sub_keys = torch.stack([torch.stack([k1, k2]) for _, k1, _, k2 in heads])  # (heads, 2, n, d/2)
    query_var = ((query.double() @ stats.xx) * query.double()).sum(1) / max(stats.tokens, 1)
    return PeerPlan(shared=shared, routed=routed, slots=slots, query=query, sub_keys=sub_keys,
                    query_var=query_var.float())


def shared_and_routed(neurons: int, shared: int, stats: LayerStats | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The `shared` neurons most often strongly active (the first ones without statistics), and the others."""
    order = torch.arange(neurons) if stats is None else stats.hot.argsort(descending=True, stable=True)
    return order[:shared].sort().values, order[shared:].sort().values


def rows_plan(ffn: FFN, spec: PeerSpec, stats: LayerStats | None) -> PeerPlan:
    """Rows retrieval: heads that each own a grid row and score its neurons by exactly their own linear scores.

    Neurons fill the valid slots in order. Head (r, sign) has queries of d = 2n: the row half is the
    constant 1 (query_norm's bias on a zero query row) against K1 = `margin` on row r only, so row
    r's slots lead every other row's by the margin; the column half is the score vectors of row r's
    neurons (query rows) against K2 = the identity. Slot (r, c) then scores margin + s_(r,c)·x: the
    head's top-k are the top-k of its row by each neuron's own score. A gated FFN's two heads per
    row take both tails of the up score v·x (|v·x| is what matters), each nudged by the gate:
    s = sign * v + w, w = GATE_SHARE * (rms v·x / rms g·x) * g. The cost is PEER's arithmetic at the
    size of the FFN's projections: queries (heads * 2n, H), half of them zero rows.
    Without statistics (full retrieval) the column halves are zero: every head takes its whole row.
    """
    shared, routed = shared_and_routed(ffn.intermediate_size, spec.shared_experts, stats)
    n, H = grid_side(len(routed)), ffn.hidden_size
    signs = (1.0, -1.0) if ffn.gate is not None else (1.0,)
    device = "meta" if ffn.up.is_meta else "cpu"
    slots = valid_slots(len(routed))  # in order: random or hot-stratified placements measured no better
    up, gate = torch.zeros(2, n * n, H, device=device)  # each slot's score vectors (padding: zero)
    if stats is not None:
        up[slots], gate[slots] = _score_vectors(ffn, routed, stats)
    blank = torch.zeros(n, H, device=device)
    rows = zip(up.view(n, n, H), gate.view(n, n, H))
    query = torch.cat([torch.cat([blank, sign * u + g]) for u, g in rows for sign in signs])
    heads = n * len(signs)
    query_var = None
    margin = 1.0  # zero column halves: any margin picks the row
    if stats is not None:
        query_var = _rms(query, stats) ** 2
        margin = 1e3 * float(query_var.max().sqrt())  # scores of a few rms differ by << margin, which float32 resolves
    k1 = torch.zeros(n, n, n, device=device)  # per row r: margin at [r, 0], where the row half's 1 is
    k1[torch.arange(n), torch.arange(n), 0] = margin
    sub_keys = torch.stack([k1.repeat_interleave(len(signs), 0), torch.eye(n, device=device).expand(heads, n, n)], 1)
    query_bias = torch.zeros(heads, 2 * n, device=device)
    query_bias[:, 0] = 1
    return PeerPlan(shared=shared, routed=routed, slots=slots, query=query, sub_keys=sub_keys,
                    query_var=query_var, query_bias=query_bias.flatten())


def _score_vectors(ffn: FFN, routed: torch.Tensor, stats: LayerStats) -> tuple[torch.Tensor, torch.Tensor]:
    """v (N, H), the routed neurons' up predictors, and w (N, H), their gate rows at GATE_SHARE of v's rms
    (zero when not gated), float32."""
    v = up_predictors(ffn, stats)[:, routed].T.float()
    if ffn.gate is None:
        return v, torch.zeros_like(v)
    gate = ffn.gate[routed].float()
    return v, gate * (GATE_SHARE * _rms(v, stats) / _rms(gate, stats).clamp_min(1e-12))[:, None]


def _rms(vectors: torch.Tensor, stats: LayerStats) -> torch.Tensor:
    """(N,) float32 root mean square of x·v over the calibration inputs x, for each of the vectors (N, H)."""
    v = vectors.double()
    return ((v @ stats.xx) * v).sum(1).div(max(stats.tokens, 1)).sqrt().float()


def gram_root(stats: LayerStats) -> torch.Tensor:
    """R (H, H) float64 with RᵀR = XᵀX + ridge: ||R (w - v)|| is the error of scoring with v instead of w."""
    gram = stats.xx + RIDGE * stats.xx.diagonal().mean() * torch.eye(stats.hidden, dtype=stats.xx.dtype)
    return torch.linalg.cholesky(gram).T


def fitted_predictors(stats: LayerStats) -> torch.Tensor:
    """(H, I) float64: each neuron's least-squares predictor of its share of the token's contribution mass."""
    root = gram_root(stats)
    return torch.cholesky_solve(stats.xs, root.T)


def up_predictors(ffn: FFN, stats: LayerStats) -> torch.Tensor:
    """(H, I) float64: each neuron's up row times its mean contribution over its rms |u·x|.

    |x·v| is then the neuron's usual contribution scaled by how far its up projection is from
    zero for this token, which ranks a gated FFN's neurons nearly as well as the oracle does
    (SmolLM2-135M at 50 %: ×1.22 perplexity unconstrained, ×1.91 for the least-squares fit).
    """
    up = ffn.up.double()
    rms = ((up @ stats.xx) * up).sum(1).div(max(stats.tokens, 1)).clamp_min(1e-24).sqrt()
    return (up * (stats.mass / max(stats.tokens, 1) / rms).unsqueeze(1)).T


def factor(rows: torch.Tensor, cols: torch.Tensor, half: int) -> tuple[torch.Tensor, ...]:
    """Query halves and sub-keys that score row r as x·rows[r] and column c as x·cols[c].

    rows, cols (n, H) -> W1 (half, H), K1 (n, half), W2 (half, H), K2 (n, half), with K1 W1 = rows
    (best rank-`half` approximation when half < n), split evenly between keys and queries.
    """
    def one(table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        u, s, vh = torch.linalg.svd(table, full_matrices=False)
        r = min(half, len(s))
        root = s[:r].sqrt()
        w = torch.zeros(half, table.shape[1])
        k = torch.zeros(table.shape[0], half)
        w[:r], k[:, :r] = root[:, None] * vh[:r], u[:, :r] * root
        return w, k

    w1, k1 = one(rows)
    w2, k2 = one(cols)
    return w1, k1, w2, k2


def head_tables(z: torch.Tensor, slots: torch.Tensor, n: int, heads: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Row and column vectors (n, D) of each head: the first fits z, each next one what is left."""
    rows, cols = slots // n, slots % n
    left, tables = z, []
    for _ in range(heads):
        a, b = additive_fit(left, rows, cols, n)
        tables.append((a, b))
        left = left - a[rows] - b[cols]
    return tables


def additive_fit(z: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, n: int, iters: int = 8):
    """Least-squares a (n, D), b (n, D) with z_i ≈ a[rows_i] + b[cols_i] (alternating means).

    On n x n sums, not on the points: with M the grid's occupancy, a row's points sum to Z_r and
    their column vectors to (M b)_r, so each step is a few (n, n) x (n, D) products.
    """
    occupied = torch.zeros(n, n, dtype=z.dtype)
    occupied[rows, cols] = 1
    row_sums = torch.zeros(n, len(z), dtype=z.dtype)
    row_sums[rows, torch.arange(len(z))] = 1
    col_sums = torch.zeros_like(row_sums)
    col_sums[cols, torch.arange(len(z))] = 1
    row_sums, col_sums = row_sums @ z, col_sums @ z  # (n, D): one-hot products, faster than index_add_
    per_row = occupied.sum(1).clamp_min(1).unsqueeze(1)
    per_col = occupied.sum(0).clamp_min(1).unsqueeze(1)
    b = z.new_zeros(n, z.shape[1])
    for _ in range(iters):
        a = (row_sums - occupied @ b) / per_row
        b = (col_sums - occupied.T @ a) / per_col
    return a, b


# ---------------------------------------------------------------------------- placement


def place(z: torch.Tensor, n: int, gen: torch.Generator, sweeps: int = SWEEPS) -> torch.Tensor:
    """(N,) a distinct valid slot of the n x n grid for each of the N points z (N, D), chosen so that
    z_i ≈ a[row] + b[column] holds well: k-means rows, then alternate matching each row's points to
    its columns and each column's points to its rows against the current fit."""
    N = len(z)
    capacity = _line_capacity(n, N)
    centroids = z[torch.randperm(N, generator=gen)[:n]]
    for _ in range(4):  # a few balanced k-means steps give the rows
        rows = assign(-torch.cdist(z, centroids), capacity)
        centroids = torch.zeros_like(centroids).index_add_(0, rows, z) / capacity.clamp_min(1).unsqueeze(1)
    residual = z - centroids[rows]
    slots = _rematch(z, rows * n, centroids, residual[torch.randperm(N, generator=gen)[:n]], n, by_row=True)
    for _ in range(sweeps):
        a, b = additive_fit(z, slots // n, slots % n, n)
        slots = _rematch(z, slots, a, b, n, by_row=False)
        a, b = additive_fit(z, slots // n, slots % n, n)
        slots = _rematch(z, slots, a, b, n, by_row=True)
    return slots


def _line_capacity(n: int, neurons: int) -> torch.Tensor:
    """(n,) valid slots in each row (the same per column: padding lies on two diagonals)."""
    slots = valid_slots(neurons)
    return torch.bincount(slots // n, minlength=n)


def _rematch(z: torch.Tensor, slots: torch.Tensor, a: torch.Tensor, b: torch.Tensor, n: int,
             by_row: bool) -> torch.Tensor:
    """Reassign each point within its line: by_row keeps rows and picks columns, else keeps columns.

    A point in row r going to column c costs ||z - a_r - b_c||², so within a line the matching
    maximises 2 z·v - ||v||² with v = a_r + b_c, over the line's valid cells (all lines at once).
    """
    line = slots // n if by_row else slots % n  # (N,)
    other = torch.arange(n)
    cells = line[:, None] * n + other if by_row else other * n + line[:, None]  # (N, n) each point's line
    rows, cols = cells // n, cells % n
    v_norms = ((a[:, None, :] + b[None, :, :]) ** 2).sum(-1)  # (n, n): ||a_r + b_c||²
    benefit = 2 * ((z @ a.T).gather(1, rows) + (z @ b.T).gather(1, cols)) - v_norms[rows, cols]
    grid = torch.arange(n * n)
    valid = ~is_padding(grid // n, grid % n, n, n * n - len(z))
    return assign(benefit, valid.long(), cells)


def assign(benefit: torch.Tensor, capacity: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
    """Greedy balanced assignment: (P,) a target for each of P points, target j taking at most capacity[j].

    benefit (P, C) of each point's C candidate targets, targets (P, C) their ids (default: 0..C-1
    for every point). Each round every unplaced point proposes its best candidate with room left,
    and each target accepts its best proposers up to its room (as partition.balanced_kmeans does,
    with room per target). Every point must be able to find room.
    """
    P, C = benefit.shape
    targets = torch.arange(C).expand(P, C) if targets is None else targets
    T = len(capacity)
    labels = torch.full((P,), -1, dtype=torch.long)
    room = capacity.clone()
    while (free := (labels < 0).nonzero().squeeze(1)).numel():
        options = targets[free]
        best = benefit[free].masked_fill(room[options] == 0, -torch.inf).max(dim=1)
        target = options.gather(1, best.indices.unsqueeze(1)).squeeze(1)
        order = best.values.argsort(descending=True)
        order = order[target[order].argsort(stable=True)]  # grouped by target, best first
        target = target[order]
        counts = torch.bincount(target, minlength=T)
        rank = torch.arange(len(order)) - (counts.cumsum(0) - counts)[target]
        accepted = rank < room[target]
        labels[free[order[accepted]]] = target[accepted]
        room -= torch.bincount(target[accepted], minlength=T)
    return labels


# ---------------------------------------------------------------------------- measurement


@torch.no_grad()
def retrieval_recall(block: PeerBlock, x: torch.Tensor) -> tuple[int, int]:
    """How much of the oracle's choice a PEER block retrieves for FFN inputs x (T, H): (found, wanted).

    Per token the oracle takes as many routed neurons as the block retrieved (distinct, over all
    heads), those with the largest contributions |act(g·x) (u·x)| ||d||; found counts the ones the
    block retrieved too. Computes every neuron (T x n²): a measurement, not an inference path.
    """
    slots = block.retrieve(x)[0].flatten(1)
    chosen = torch.zeros(len(x), block.n * block.n, dtype=torch.bool).scatter_(1, slots, True)
    count = chosen.sum(1, keepdim=True)
    up = x @ block.up_rows.T + (0 if block.up_bias is None else block.up_bias)
    if block.gate_rows is None:
        mid = block.act_fn(up)
    else:
        mid = block.act_fn(x @ block.gate_rows.T + (0 if block.gate_bias is None else block.gate_bias)) * up
    contribution = mid.abs().float() * block.down_rows.float().norm(dim=1)  # padding slots: 0
    ranked = contribution.topk(int(count.max()), dim=1).indices
    oracle = torch.zeros_like(chosen).scatter_(1, ranked, torch.arange(ranked.shape[1]) < count)
    return int((chosen & oracle).sum()), int(oracle.sum())


@dataclass
class RecallTally:
    """Retrieval recall of a PEER model's layers over the tokens it reads (what `moeify verify` reports)."""

    found: dict[int, int] = field(default_factory=dict)  # layer -> oracle neurons retrieved
    wanted: dict[int, int] = field(default_factory=dict)  # layer -> neurons retrieved (distinct per token)
    tokens: dict[int, int] = field(default_factory=dict)

    def add(self, layer: int, block: PeerBlock, hidden: torch.Tensor) -> None:
        """One pass of block over hidden (..., H)."""
        x = hidden.reshape(-1, hidden.shape[-1])
        found, wanted = retrieval_recall(block, x)
        for counts, value in ((self.found, found), (self.wanted, wanted), (self.tokens, len(x))):
            counts[layer] = counts.get(layer, 0) + value

    def report(self, block: PeerBlock) -> dict:
        """Recall overall and per layer, and the share of neurons a token uses (shared ones counted).

        block: any of the model's PEER blocks (they share one shape).
        """
        shared = block.peer["num_shared_neurons"]
        routed = sum(self.wanted.values()) / max(sum(self.tokens.values()), 1)
        return {"recall": sum(self.found.values()) / max(sum(self.wanted.values()), 1),
                "layer_recall": {i: self.found[i] / max(self.wanted[i], 1) for i in sorted(self.found)},
                "neurons_per_token": routed + shared,
                "neuron_share": (routed + shared) / (block.peer["num_neurons"] + shared)}


def unretrieved_params(block: PeerBlock) -> int:
    """Parameters of the slots a token's retrieval leaves out (padding included): total minus these is active."""
    rows = (block.gate_rows, block.up_rows, block.down_rows, block.gate_bias, block.up_bias)
    per_slot = sum(t.numel() for t in rows if t is not None) // block.n ** 2
    return (block.n ** 2 - min(block.heads * block.top_k, block.peer["num_neurons"])) * per_slot
