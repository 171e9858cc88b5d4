"""The remote format's expert kernels: every one computes what the experts' own modules compute.

A block's routed experts can run through their modules (the reference), grouped products over
tokens sorted by expert, gathered weights per token, or one dense FFN masked per token. Each is
forced in turn on the same block and compared with the module path, outputs and gradients, over
fine and coarse splits (G experts cut from one FFN, top-G/2), odd widths, both scorings, shared
experts and biases.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from moeify.targets.remote_code.configuration_moeify import MOE_DEFAULTS
from moeify.targets.remote_code.modeling_moeify import Kernel, MoeifyBlock
from tests.fixtures import make_tiny
from tests.test_remote_block import load, remote_checkpoint, tokens

HIDDEN = 32
FFN = 768  # neurons of the FFN the G experts are cut from
TOLERANCE = dict(atol=1e-5, rtol=1e-5)  # outputs are O(1): float32 reordering, nothing more

# (experts, top-k, width, moe fields): G = 1, 8, 64, 256 of one FFN, then odd widths
CASES = [
    (1, 1, FFN, {}),
    (8, 4, FFN // 8, {}),
    (64, 32, FFN // 64, {"scoring": "unit"}),
    (256, 128, FFN // 256, {"scoring": "unit", "num_shared_experts": 1}),
    (64, 16, FFN // 64, {"num_shared_experts": 2, "norm_topk_prob": False}),
    (4, 1, 37, {"bias": True}),  # coarse and odd: grouped products on a width padded to 40
    (8, 3, 5, {"scoring": "unit", "bias": True}),
    (6, 2, 7, {"gated": False, "hidden_act": "gelu", "bias": True, "num_shared_experts": 1}),
]
IDS = [f"E{e}-k{k}-I{i}" + "".join(f"-{key}" for key in moe) for e, k, i, moe in CASES]


def block(experts: int, topk: int, width: int, seed: int = 0, **moe) -> MoeifyBlock:
    """A block with distinct random experts scaled so its output is O(1), and a spreading router."""
    torch.manual_seed(seed)
    b = MoeifyBlock(dict(MOE_DEFAULTS, num_experts=experts, num_experts_per_tok=topk,
                         expert_intermediate_size=width, **moe), HIDDEN)
    with torch.no_grad():
        for name, p in b.named_parameters():
            fan_in = p.shape[-1] * (topk if "down_proj.weight" in name else 1)
            p.normal_(0, fan_in ** -0.5)
    return b


def run(b: MoeifyBlock, kernel: Kernel, x: torch.Tensor, grad: bool) -> tuple[torch.Tensor, dict]:
    """Output of the block on x with `kernel` forced, and with grad the gradients of a random
    projection of it: every parameter's and the input's."""
    b.kernel = kernel
    b.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        out = b(x)
        if not grad:
            return out, {}
        probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        (out * probe).sum().backward()
    # An expert no token reached has no gradient in the module path and a zero one from stacks.
    grads = {name: p.grad if p.grad is not None else torch.zeros_like(p) for name, p in b.named_parameters()}
    return out.detach(), grads | {"input": x.grad}


@pytest.mark.parametrize("experts, topk, width, moe", CASES, ids=IDS)
@pytest.mark.parametrize("tokens_in", [1, 13])
def test_every_kernel_equals_the_module_path(experts, topk, width, moe, tokens_in):
    b = block(experts, topk, width, **moe)
    x = torch.randn(tokens_in, HIDDEN, generator=torch.Generator().manual_seed(2))
    expected, _ = run(b, Kernel.MODULE, x, grad=False)
    for kernel in Kernel:
        out, _ = run(b, kernel, x, grad=False)
        torch.testing.assert_close(out, expected, **TOLERANCE, msg=lambda m: f"{kernel}: {m}")
    assert b._packed is not None  # the kernels ran on the packed stacks


@pytest.mark.parametrize("experts, topk, width, moe", CASES, ids=IDS)
def test_every_kernel_has_the_module_paths_gradients(experts, topk, width, moe):
    b = block(experts, topk, width, **moe)
    x = torch.randn(2, 7, HIDDEN, generator=torch.Generator().manual_seed(3))
    expected, expected_grads = run(b, Kernel.MODULE, x, grad=True)
    if experts > 1:  # one expert's probability is 1 whatever the router says
        assert expected_grads["router.weight"].abs().sum() > 0  # the router learns through every path
    for kernel in Kernel:
        out, grads = run(b, kernel, x, grad=True)
        torch.testing.assert_close(out, expected, **TOLERANCE)
        for name, grad in expected_grads.items():
            torch.testing.assert_close(grads[name], grad, **TOLERANCE, msg=lambda m: f"{kernel} {name}: {m}")
    assert b._packed is None  # under autograd the stacks are built from the parameters, nothing packed


@pytest.mark.parametrize("kernel", list(Kernel))
def test_capacity_dropping_is_the_same_in_every_kernel(kernel):
    b = block(8, 2, 12, capacity_factor=0.5).train()
    x = torch.randn(16, HIDDEN, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert not b.route(x).keep.all()  # some assignments are dropped
    expected, expected_grads = run(b, Kernel.MODULE, x, grad=True)
    out, grads = run(b, kernel, x, grad=True)
    torch.testing.assert_close(out, expected, **TOLERANCE)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, **TOLERANCE)


def test_plan_picks_by_share_width_and_token_count():
    fine, coarse = block(256, 128, 6), block(8, 4, 192)  # SmolLM2's FFN cut in 256 and in 8, 50 % active
    one, many = torch.randn(1, HIDDEN), torch.randn(512, HIDDEN)
    with torch.no_grad():
        assert fine.plan(one) is Kernel.GATHER and coarse.plan(one) is Kernel.GATHER
        assert fine.plan(many) is Kernel.MASKED and coarse.plan(many) is Kernel.GROUPED
        assert block(64, 8, 24).plan(many) is Kernel.GROUPED  # 1/8 active: few enough to group
        assert block(8, 8, 192).plan(many) is Kernel.MASKED  # everything active: the dense FFN
    assert fine.plan(many) is Kernel.MASKED and coarse.plan(many) is Kernel.MODULE  # under autograd
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        assert fine.plan(many) is Kernel.MODULE


def test_wrapped_experts_take_the_module_path_even_when_a_kernel_is_forced():
    b = block(8, 4, 16)
    b.kernel = Kernel.MASKED
    x = torch.randn(5, HIDDEN)
    b.experts[3].up_proj = nn.Sequential(b.experts[3].up_proj)  # what LoRA or a quantizer does
    with torch.no_grad():
        assert b.plan(x) is Kernel.MODULE
        out = b(x)
    assert b._packed is None
    b.experts[3].up_proj = b.experts[3].up_proj[0]
    with torch.no_grad():
        torch.testing.assert_close(b(x), out)


def test_padded_stacks_keep_parameters_names_and_values():
    """Packing (padded, down projections transposed) changes storage, never what is saved."""
    b = block(4, 1, 37, bias=True)
    before = {name: t.clone() for name, t in b.state_dict().items()}
    with torch.no_grad():
        b(torch.randn(9, HIDDEN))
    stacks = b._packed
    assert stacks.width == 40 and stacks.w_in.shape == (4, 80, HIDDEN) and stacks.w_out.shape == (4, 40, HIDDEN)
    assert stacks.w_in[:, 37:40].abs().sum() == 0 and stacks.w_out[:, 37:].abs().sum() == 0
    assert not b.experts[0].down_proj.weight.is_contiguous()  # a view of its stack
    after = b.state_dict()
    assert list(after) == list(before)
    for name, tensor in after.items():
        assert tensor.is_contiguous() and torch.equal(tensor, before[name]), name
    assert isinstance(b.state_dict(keep_vars=True)["experts.0.down_proj.weight"], nn.Parameter)


def test_bfloat16_kernels_run_and_agree():
    b = block(16, 4, 24).to(torch.bfloat16)  # 24 bf16 = 48-byte rows: padded to 32 for grouped products
    x = torch.randn(11, HIDDEN, dtype=torch.bfloat16)
    with torch.no_grad():
        expected, _ = run(b, Kernel.MODULE, x, grad=False)
        for kernel in Kernel:
            torch.testing.assert_close(run(b, kernel, x, grad=False)[0], expected, atol=2e-2, rtol=2e-2)


def test_fine_split_model_trains_saves_and_reloads(tmp_path: Path):
    """A fine-grained remote model: inference packs, a training step runs the masked FFN under
    autograd, and save_pretrained writes the trained weights under their usual names."""
    folder = remote_checkpoint(make_tiny("llama", tmp_path / "dense"), tmp_path / "remote", experts=32, topk=16)
    model = load(folder)
    assert json.loads((folder / "config.json").read_text())["moe"]["expert_intermediate_size"] == 96
    x = tokens()
    with torch.no_grad():
        model(x)  # packs
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(x, labels=x).loss.backward()
    optimizer.step()
    model.eval()
    with torch.no_grad():
        trained = model(x).logits
    model.save_pretrained(tmp_path / "again")
    again = load(tmp_path / "again")
    assert type(again).__name__ == "MoeifyForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, trained, **TOLERANCE)


def test_changed_experts_are_noticed():
    """One token checks a sample (the first and last experts); more tokens check every expert."""
    b = block(16, 8, 12)
    one, many = torch.randn(1, HIDDEN), torch.randn(6, HIDDEN)
    with torch.no_grad():
        b(one)  # packs
        b.experts[-1].up_proj = nn.Sequential(b.experts[-1].up_proj)  # a wrapper on the last expert
        b.kernel = Kernel.MODULE
        wrapped = b(one)
        b.kernel = None
        assert b.plan(one) is Kernel.MODULE
        torch.testing.assert_close(b(one), wrapped)
        b.experts[-1].up_proj = b.experts[-1].up_proj[0]
        b.experts[7].down_proj.weight = nn.Parameter(torch.randn(HIDDEN, 12))  # new storage, mid-block
        b.kernel = Kernel.MODULE
        expected = b(many)
        b.kernel = None
        torch.testing.assert_close(b(many), expected, **TOLERANCE)  # repacked
        assert torch.equal(b._packed.w_out[7].t(), b.experts[7].down_proj.weight)
