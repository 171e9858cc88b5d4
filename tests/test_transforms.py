"""transforms.py: pure tensor functions on one layer's FFN, checked against a reference MoE forward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moeify.spec import Spec
from moeify.transforms import (
    FFN, LazyExperts, MoELayer, add_noise, drop_upcycle, generator, make_router, pieces, seed_for, upcycle,
)

H, I = 16, 24


def make_ffn(bias: bool = False, gated: bool = True, seed: int = 0, dtype=torch.float64) -> FFN:
    gen = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype) * 0.5

    return FFN(up=r(I, H), down=r(H, I), gate=r(I, H) if gated else None,
               up_bias=r(I) if bias else None, gate_bias=r(I) if bias and gated else None,
               down_bias=r(H) if bias else None)


def ffn_forward(ffn: FFN, x: torch.Tensor) -> torch.Tensor:
    up = F.linear(x, ffn.up, ffn.up_bias)
    h = F.silu(F.linear(x, ffn.gate, ffn.gate_bias)) * up if ffn.gate is not None else F.silu(up)
    return F.linear(h, ffn.down, ffn.down_bias)


def moe_forward(moe: MoELayer, x: torch.Tensor) -> torch.Tensor:
    """Mixtral-style routing: softmax over router logits, top-k, renormalised over the top-k."""
    probs = torch.softmax(x @ moe.router.T, dim=-1)
    weights, chosen = probs.topk(moe.topk, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    outputs = torch.stack([ffn_forward(e, x) for e in moe.experts], dim=1)  # (T, E, H)
    routed = (weights.unsqueeze(-1) * outputs.gather(1, chosen.unsqueeze(-1).expand(-1, -1, x.shape[-1]))).sum(1)
    return routed + sum((ffn_forward(s, x) for s in moe.shared), torch.zeros_like(routed))




def tokens(n: int = 32, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(n, H, generator=torch.Generator().manual_seed(123), dtype=dtype)


# ---------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize(
    "experts, topk, granularity, shared",
    [(2, 1, 1, 0), (8, 2, 1, 0), (4, 4, 1, 0), (4, 2, 2, 0), (2, 1, 4, 0), (4, 2, 1, 1), (4, 1, 2, 2)],
)
def test_upcycle_reproduces_the_ffn(bias, experts, topk, granularity, shared):
    ffn = make_ffn(bias=bias)
    spec = Spec(experts=experts, topk=topk, granularity=granularity, shared_experts=shared, router_std=1.0)
    moe = upcycle(ffn, spec, layer=3)
    assert len(moe.experts) == experts * granularity
    assert moe.topk == topk * granularity
    assert moe.router.shape == (experts * granularity, H)
    assert len(moe.shared) == shared
    for e in moe.experts:
        assert e.intermediate_size == I // granularity and e.hidden_size == H
    x = tokens()
    # The router is not uniform: different tokens pick different experts.
    chosen = (x @ moe.router.T).topk(moe.topk, dim=-1).indices
    if experts > topk:
        assert len({tuple(sorted(row.tolist())) for row in chosen}) > 1
    torch.testing.assert_close(moe_forward(moe, x), ffn_forward(ffn, x), rtol=1e-10, atol=1e-10)


def test_upcycle_with_a_plain_ffn():
    ffn = make_ffn(gated=False, bias=True)
    moe = upcycle(ffn, Spec(experts=4, topk=2, granularity=2), layer=0)
    assert all(e.gate is None for e in moe.experts)
    torch.testing.assert_close(moe_forward(moe, tokens()), ffn_forward(ffn, tokens()), rtol=1e-10, atol=1e-10)


def test_granular_pieces_share_a_router_row():
    moe = upcycle(make_ffn(), Spec(experts=3, topk=1, granularity=4), layer=0)
    rows = moe.router.view(3, 4, H)
    assert torch.equal(rows, rows[:, :1].expand(-1, 4, -1))
    assert not torch.equal(rows[0, 0], rows[1, 0])


def test_pieces_sum_to_the_ffn():
    for bias in (False, True):
        ffn = make_ffn(bias=bias)
        cut = pieces(ffn, 3)
        assert [p.intermediate_size for p in cut] == [8, 8, 8]
        assert torch.equal(torch.cat([p.up for p in cut]), ffn.up)
        assert torch.equal(torch.cat([p.down for p in cut], dim=1), ffn.down)
        x = tokens()
        torch.testing.assert_close(sum(ffn_forward(p, x) for p in cut), ffn_forward(ffn, x))
    assert pieces(ffn, 1) == [ffn]


def test_router_init():
    like = torch.empty(1, dtype=torch.bfloat16)
    router = make_router(64, 256, Spec(router_std=0.02, seed=5), like, layer=2)
    assert router.shape == (64, 256) and router.dtype == torch.bfloat16
    assert 0.018 < router.float().std().item() < 0.022 and abs(router.float().mean().item()) < 0.002
    assert torch.equal(router, make_router(64, 256, Spec(router_std=0.02, seed=5), like, layer=2))
    assert not torch.equal(router, make_router(64, 256, Spec(router_std=0.02, seed=5), like, layer=3))
    assert not torch.equal(router, make_router(64, 256, Spec(router_std=0.02, seed=6), like, layer=2))
    zeros = make_router(8, 16, Spec(router_init="zeros"), like, layer=0)
    assert zeros.dtype == torch.bfloat16 and not zeros.any()


def test_zero_router_routes_uniformly_and_stays_exact():
    ffn = make_ffn()
    moe = upcycle(ffn, Spec(experts=4, topk=2, router_init="zeros"), layer=0)
    assert not moe.router.any()
    torch.testing.assert_close(moe_forward(moe, tokens()), ffn_forward(ffn, tokens()), rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------- symmetry breaking


def test_noise_changes_weights_not_biases_and_is_seeded():
    ffn = make_ffn(bias=True)
    noisy = add_noise(ffn, 0.1, generator(0, "x"))
    for role in ("gate", "up", "down"):
        diff = getattr(noisy, role) - getattr(ffn, role)
        assert 0.07 < diff.std().item() < 0.13, role
    for role in ("gate_bias", "up_bias", "down_bias"):
        assert torch.equal(getattr(noisy, role), getattr(ffn, role))
    again = add_noise(ffn, 0.1, generator(0, "x"))
    assert all(torch.equal(a, b) for a, b in zip(noisy.tensors().values(), again.tensors().values()))
    assert add_noise(ffn, 0.0, generator(0, "x")) is ffn


@pytest.mark.parametrize("ratio", [0.25, 0.3, 0.5, 0.9])
def test_drop_upcycle_redraws_round_r_times_i_neurons_in_all_three_matrices(ratio):
    ffn = make_ffn(bias=True, dtype=torch.float32)
    dropped = drop_upcycle(ffn, ratio, generator(1, "drop"))
    changed_gate = (dropped.gate != ffn.gate).any(dim=1).nonzero().flatten()
    changed_up = (dropped.up != ffn.up).any(dim=1).nonzero().flatten()
    changed_down = (dropped.down != ffn.down).any(dim=0).nonzero().flatten()
    assert len(changed_gate) == round(ratio * I)  # 0.3 * 24 = 7.2 -> 7, 0.9 * 24 = 21.6 -> 22
    assert torch.equal(changed_gate, changed_up) and torch.equal(changed_gate, changed_down)
    # A redrawn neuron is redrawn whole; the rest are untouched.
    assert (dropped.gate[changed_gate] != ffn.gate[changed_gate]).all()
    keep = torch.ones(I, dtype=torch.bool)
    keep[changed_gate] = False
    assert torch.equal(dropped.gate[keep], ffn.gate[keep]) and torch.equal(dropped.down[:, keep], ffn.down[:, keep])
    # Biases of the redrawn neurons are redrawn with them; the down bias is not per neuron.
    assert torch.equal((dropped.up_bias != ffn.up_bias).nonzero().flatten(), changed_gate)
    assert torch.equal(dropped.down_bias, ffn.down_bias)
    assert drop_upcycle(ffn, 0.0, generator(1, "drop")) is ffn


def test_drop_upcycle_draws_from_the_statistics_of_the_replaced_weights():
    I_big, H_big = 512, 256
    gen = torch.Generator().manual_seed(0)
    ffn = FFN(up=torch.randn(I_big, H_big, generator=gen) * 3 + 1, down=torch.randn(H_big, I_big, generator=gen) * 0.1,
              gate=torch.randn(I_big, H_big, generator=gen) * 0.5 - 2)
    dropped = drop_upcycle(ffn, 0.5, generator(0, "d"))
    idx = (dropped.up != ffn.up).any(dim=1).nonzero().flatten()
    assert len(idx) == 256
    for role, mean, std in (("up", 1.0, 3.0), ("gate", -2.0, 0.5)):
        new = getattr(dropped, role)[idx]
        assert abs(new.mean().item() - mean) < 0.05 * std + 0.02, role
        assert abs(new.std().item() / std - 1) < 0.05, role
    assert abs(dropped.down[:, idx].std().item() / 0.1 - 1) < 0.05


def test_symmetry_breaking_makes_experts_differ_but_keeps_routers():
    ffn = make_ffn()
    plain = upcycle(ffn, Spec(experts=4, topk=2, seed=3), layer=1)
    for spec in (Spec(experts=4, topk=2, seed=3, noise=0.01), Spec(experts=4, topk=2, seed=3, drop_ratio=0.5),
                 Spec(experts=4, topk=2, seed=3, noise=0.01, drop_ratio=0.25)):
        moe = upcycle(ffn, spec, layer=1)
        assert torch.equal(moe.router, plain.router)
        ups = [moe.experts[j].up for j in range(4)]
        for a in range(4):
            assert not torch.equal(ups[a], ffn.up)
            for b in range(a + 1, 4):
                assert not torch.equal(ups[a], ups[b])
        again = upcycle(ffn, spec, layer=1)
        assert all(torch.equal(moe.experts[j].down, again.experts[j].down) for j in range(4))
        other_layer = upcycle(ffn, spec, layer=2)
        assert not torch.equal(moe.experts[0].up, other_layer.experts[0].up)


def test_symmetry_breaking_does_not_depend_on_access_order():
    spec = Spec(experts=6, topk=2, seed=9, noise=0.05, drop_ratio=0.3)
    forward = upcycle(make_ffn(), spec, layer=0)
    backward = upcycle(make_ffn(), spec, layer=0)
    first = [forward.experts[j].gate.clone() for j in range(6)]
    last = [backward.experts[j].gate.clone() for j in reversed(range(6))][::-1]
    assert all(torch.equal(a, b) for a, b in zip(first, last))


def test_granular_noise_cuts_one_noisy_copy_into_pieces():
    ffn = make_ffn()
    moe = upcycle(ffn, Spec(experts=2, topk=1, granularity=3, noise=0.05, seed=1), layer=0)
    # Pieces of a copy share its noise: put back together, they are one whole noisy FFN.
    copy0 = torch.cat([moe.experts[j].up for j in range(3)])
    copy1 = torch.cat([moe.experts[j].up for j in range(3, 6)])
    assert copy0.shape == ffn.up.shape and not torch.equal(copy0, copy1)
    assert 0.03 < (copy0 - ffn.up).std().item() < 0.07


# ---------------------------------------------------------------------------- plumbing


def test_lazy_experts_build_on_demand_and_keep_one():
    made = []

    def make(j):
        made.append(j)
        return make_ffn(seed=j)

    lazy = LazyExperts(4, make)
    assert len(lazy) == 4 and made == []
    a = lazy[2]
    assert lazy[2] is a and lazy[-2] is a and made == [2]
    lazy[0]
    lazy[2]
    assert made == [2, 0, 2]
    assert [e.up.shape for e in lazy[1:3]] == [(I, H), (I, H)]
    with pytest.raises(IndexError):
        lazy[4]
    with pytest.raises(IndexError):
        lazy[-5]


def test_upcycle_plans_on_meta_tensors():
    meta = FFN(up=torch.empty(I, H, device="meta"), down=torch.empty(H, I, device="meta"),
               gate=torch.empty(I, H, device="meta"))
    moe = upcycle(meta, Spec(experts=4, topk=2, granularity=2, noise=0.1, drop_ratio=0.5), layer=0)
    assert moe.router.is_meta and moe.router.shape == (8, H)
    assert all(e.up.is_meta and e.up.shape == (I // 2, H) and e.down.shape == (H, I // 2) for e in moe.experts)


def test_seed_for_is_stable_and_distinct():
    assert seed_for(0, 1, "expert", 2) == seed_for(0, 1, "expert", 2)
    assert 0 <= seed_for(0, 1, "expert", 2) < 2**63
    seeds = {seed_for(s, layer, "expert", j) for s in range(3) for layer in range(4) for j in range(8)}
    assert len(seeds) == 3 * 4 * 8
