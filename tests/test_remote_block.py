"""The remote-format modeling code: checkpoints built here by hand, per the format contract.

Each checkpoint copies a tiny dense model's FFN into every expert (norm_topk_prob, so the top-k
weights sum to 1 and the MoE computes the dense FFN exactly), with a random router so tokens
really go to different experts.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from moeify.adapters import adapter_for
from moeify.checkpoint import Checkpoint
from moeify.targets.remote_code.configuration_moeify import MOE_DEFAULTS, MoeifyConfig
from moeify.targets.remote_code.modeling_moeify import MoeifyBlock, MoeifyForCausalLM, load_balancing_loss
from moeify.transforms import FFN
from tests.fixtures import TINY, make_tiny

CODE = Path(__file__).parents[1] / "moeify" / "targets" / "remote_code"
ROLE_NAMES = {"gate": "gate_proj.weight", "up": "up_proj.weight", "down": "down_proj.weight",
              "gate_bias": "gate_proj.bias", "up_bias": "up_proj.bias", "down_bias": "down_proj.bias"}
AUTO_MAP = {"AutoConfig": "configuration_moeify.MoeifyConfig",
            "AutoModelForCausalLM": "modeling_moeify.MoeifyForCausalLM"}


def ffn_tensors(prefix: str, ffn: FFN) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{ROLE_NAMES[role]}": t.clone().contiguous() for role, t in ffn.tensors().items()}


def remote_checkpoint(dense: Path, out: Path, layers: list[int] | None = None, experts: int = 4, topk: int = 2,
                      shared: int = 0, output_bias: bool = False, **moe) -> Path:
    """A remote-format upcycle of a dense folder: copies of each FFN (scaled 1/(S+1), as are the shared ones)."""
    adapter = adapter_for(json.loads((dense / "config.json").read_text()))
    ckpt = adapter.loaded(Checkpoint(dense))
    layers = list(range(adapter.num_layers(ckpt.config))) if layers is None else layers
    paths = [adapter.mlp_path(i) + "." for i in layers]
    tensors = {name: ckpt.read(name) for name in ckpt.names() if not name.startswith(tuple(paths))}
    gen = torch.Generator().manual_seed(1)
    for i in layers:
        ffn = adapter.read_ffn(ckpt, i).scaled(1 / (shared + 1))
        base = adapter.mlp_path(i)
        if output_bias:  # the (scaled) down bias moves out of the experts into the block's output bias
            tensors[f"{base}.output_bias"] = ffn.down_bias * (shared + 1)
            ffn = ffn.map(lambda role, t: torch.zeros_like(t) if role == "down_bias" else t)
        tensors[f"{base}.router.weight"] = torch.randn(experts, ffn.hidden_size, generator=gen)
        if moe.get("aux_free_bias"):
            tensors[f"{base}.router.expert_bias"] = torch.zeros(experts)
        for j in range(experts):
            tensors |= ffn_tensors(f"{base}.experts.{j}", ffn)
        for s in range(shared):
            tensors |= ffn_tensors(f"{base}.shared_experts.{s}", ffn)
    out.mkdir(parents=True)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    block = dict(mlp_path=adapter.mlp, moe_layers=layers, num_experts=experts, num_experts_per_tok=topk,
                 expert_intermediate_size=ffn.intermediate_size, num_shared_experts=shared,
                 shared_intermediate_size=ffn.intermediate_size, hidden_act=adapter.activation(ckpt.config),
                 gated=adapter.gated, bias=adapter.bias, output_bias=output_bias, norm_topk_prob=True, **moe)
    config = {"model_type": "moeify", "architectures": ["MoeifyForCausalLM"], "auto_map": AUTO_MAP,
              "base_config": ckpt.config, "moe": block}
    (out / "config.json").write_text(json.dumps(config, indent=1))
    for name in ("configuration_moeify.py", "modeling_moeify.py"):
        shutil.copy(CODE / name, out / name)
    return out


def load(folder: Path):
    model, info = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def tokens(vocab: int = 200, batch: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(0))


def greedy(model, prompt: torch.Tensor) -> torch.Tensor:
    return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10, do_sample=False,
                          min_new_tokens=10, pad_token_id=0)


# Every family: all layers MoE for three of them, only layer 1 for the others (layer 0 stays dense).
VARIANTS = [(f, {} if f in ("llama", "gpt2", "gpt_neox") else {"layers": [1]}) for f in TINY] + [
    ("llama", dict(shared=1, layers=[0, 2], aux_free_bias=True)),
    ("gpt2", dict(shared=2, layers=[1])),
    ("gpt_neox", dict(output_bias=True, experts=6, topk=3)),
]


@pytest.mark.parametrize("family, options", VARIANTS, ids=[f"{f}-{i}" for i, (f, _) in enumerate(VARIANTS)])
def test_loads_exact_and_generates_like_the_dense_model(tmp_path: Path, family: str, options: dict):
    dense_dir = make_tiny(family, tmp_path / "dense")
    remote = load(remote_checkpoint(dense_dir, tmp_path / "remote", **options))
    dense = AutoModelForCausalLM.from_pretrained(dense_dir).eval()
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(remote(x).logits, dense(x).logits, atol=1e-4, rtol=0)
    assert torch.equal(greedy(remote, x[:1]), greedy(dense, x[:1]))
    assert type(remote).__name__ == "MoeifyForCausalLM"
    assert remote.config.vocab_size == dense.config.vocab_size  # the family's fields read through


def test_routing_is_not_trivial(tmp_path: Path):
    """The exactness above would hold vacuously if every token went to the same experts."""
    remote = load(remote_checkpoint(make_tiny("llama", tmp_path / "dense"), tmp_path / "remote"))
    with torch.no_grad():
        out = remote(tokens(), output_router_logits=True)
    chosen = [logits.topk(2, dim=-1).indices for logits in out.router_logits]
    assert all(len(c.unique()) == 4 for c in chosen)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_save_pretrained_reloads_identically_with_its_code(tmp_path: Path, family: str):
    remote = load(remote_checkpoint(make_tiny(family, tmp_path / "dense"), tmp_path / "remote", layers=[1]))
    with torch.no_grad():
        remote(tokens())  # inference packs the experts' weights into stacks the parameters then view
    remote.save_pretrained(tmp_path / "again")
    config = json.loads((tmp_path / "again" / "config.json").read_text())
    assert config["auto_map"] == AUTO_MAP and config["model_type"] == "moeify"
    assert config["base_config"]["model_type"] == family and config["moe"]["moe_layers"] == [1]
    for name in ("configuration_moeify.py", "modeling_moeify.py"):
        assert (tmp_path / "again" / name).read_text() == (CODE / name).read_text()
    reloaded = load(tmp_path / "again")
    x = tokens()
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, remote(x).logits)


def test_config_round_trips_and_exposes_the_base_family(tmp_path: Path):
    base = {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 4, "vocab_size": 99}
    config = MoeifyConfig(base_config=base, moe={"moe_layers": [1], "capacity_factor": 1.5})
    config.save_pretrained(tmp_path)
    again = MoeifyConfig.from_pretrained(tmp_path)
    assert again.moe == config.moe and again.moe["capacity_factor"] == 1.5
    assert again.base_config.to_dict() == config.base_config.to_dict()
    assert again.get_text_config() is again.base_config
    assert (again.vocab_size, again.num_hidden_layers, again.hidden_size) == (99, 2, 32)
    assert again.tie_word_embeddings is True  # gpt2 ties its embeddings
    with pytest.raises(ValueError, match="scoring"):
        MoeifyConfig(base_config=base, moe={"scoring": "sigmoid"})


def test_training_step_adds_aux_loss_and_reaches_the_router(tmp_path: Path):
    folder = remote_checkpoint(make_tiny("llama", tmp_path / "dense"), tmp_path / "remote", layers=[0, 2],
                               router_aux_loss_coef=0.1)
    model = load(folder).train()
    x = tokens()
    plain = model(x, labels=x)
    assert plain.aux_loss is None and plain.router_logits is None
    out = model(x, labels=x, output_router_logits=True)
    assert len(out.router_logits) == 2 and out.router_logits[0].shape == (x.numel(), 4)
    assert torch.isfinite(out.loss) and out.aux_loss > 0
    torch.testing.assert_close(out.loss, plain.loss + 0.1 * out.aux_loss)
    out.loss.backward()
    for layer in (0, 2):
        grad = model.model.layers[layer].mlp.router.weight.grad
        assert grad is not None and grad.abs().sum() > 0
    assert model.model.layers[1].mlp.down_proj.weight.grad.abs().sum() > 0  # the dense layer trains too


def test_aux_loss_is_mixtrals_for_one_layer_and_k_when_balanced():
    logits = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
    index = logits.softmax(-1).topk(2, dim=-1).indices
    record = type("R", (), {"logits": logits, "index": index})
    torch.testing.assert_close(load_balancing_loss([record], 8), load_balancing_loss_func((logits,), 8, 2))
    uniform = type("R", (), {"logits": torch.zeros(8, 8), "index": torch.arange(16).reshape(8, 2) % 8})
    torch.testing.assert_close(load_balancing_loss([uniform], 8), torch.tensor(2.0))


def test_z_loss_is_added_with_its_coefficient(tmp_path: Path):
    folder = remote_checkpoint(make_tiny("llama", tmp_path / "dense"), tmp_path / "remote", layers=[1],
                               router_z_loss_coef=0.5)
    model = load(folder).train()
    x = tokens()
    out = model(x, labels=x, output_router_logits=True)
    z = torch.logsumexp(out.router_logits[0], dim=-1).square().mean()
    lm_only = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")(x, labels=x).loss
    torch.testing.assert_close(out.loss, lm_only + 0.01 * out.aux_loss + 0.5 * z, atol=1e-5, rtol=1e-5)


def block(hidden: int = 16, experts: int = 4, topk: int = 2, seed: int = 0, **moe) -> MoeifyBlock:
    torch.manual_seed(seed)
    b = MoeifyBlock(dict(MOE_DEFAULTS, num_experts=experts, num_experts_per_tok=topk,
                         expert_intermediate_size=24, **moe), hidden)
    with torch.no_grad():
        b.router.weight.normal_()
    return b


def test_unit_scoring_with_every_expert_selected_is_the_sum_of_experts():
    b = block(topk=4, scoring="unit")
    x = torch.randn(2, 5, 16)
    flat = x.reshape(-1, 16)
    total = sum(expert(flat) for expert in b.experts).reshape(x.shape)
    out = b(x)
    torch.testing.assert_close(out, total)
    out.square().sum().backward()
    assert b.router.weight.grad.abs().sum() > 0  # straight-through: weight 1 forward, gradient backward


def test_shared_experts_and_output_bias_add_to_the_routed_sum():
    b = block(num_shared_experts=2, output_bias=True)
    with torch.no_grad():
        b.output_bias.normal_()
    x = torch.randn(7, 16)
    routed = block()  # nothing shared, the same router and experts
    routed.load_state_dict(b.state_dict(), strict=False)
    expected = routed(x) + b.shared_experts[0](x) + b.shared_experts[1](x) + b.output_bias
    torch.testing.assert_close(b(x), expected)


def test_capacity_factor_drops_overflow_tokens_in_training_only():
    b = block(experts=4, topk=1, capacity_factor=0.5)
    with torch.no_grad():
        b.router.weight.zero_()
        b.router.weight[0] = 1.0  # every token prefers expert 0 when its features are positive
    x = torch.rand(16, 16) + 0.1
    capacity = math.ceil(0.5 * 16 * 1 / 4)  # = 2 assignments per expert
    b.train()
    with torch.no_grad():
        trained = b(x)
    kept = (trained.abs().sum(-1) > 0).nonzero().flatten().tolist()
    assert kept == list(range(capacity))  # the first tokens keep their place, the rest pass through as 0
    b.eval()
    with torch.no_grad():
        assert (b(x).abs().sum(-1) > 0).all()  # inference never drops


def test_aux_free_bias_moves_toward_balance_outside_the_gradient():
    b = block(experts=4, topk=1, aux_free_bias=True, aux_free_update_rate=0.01, norm_topk_prob=False)
    with torch.no_grad():
        b.router.weight.mul_(0.3)
        b.router.expert_bias[0] = 0.5  # start unbalanced: expert 0 wins nearly every selection
    x = torch.randn(256, 16, generator=torch.Generator().manual_seed(0))

    def heaviest_load() -> int:
        with torch.no_grad():
            return int(torch.bincount(b.route(x).index.flatten(), minlength=4).max())

    b.eval()
    before = heaviest_load()
    b.train()
    for _ in range(40):
        b(x).sum().backward()
        b.update_bias()  # MoeifyForCausalLM does this before each training forward
    b.eval()
    assert heaviest_load() < 0.6 * before
    assert b.router.expert_bias[0] < 0.5 and (b.router.expert_bias[1:] > 0).all()  # overloaded down, others up
    assert "router.expert_bias" in b.state_dict()
    assert all("expert_bias" not in name for name, _ in b.named_parameters())  # no gradient, no optimizer
    # selection only: the mixing weights stay the plain router probabilities
    routing = b.route(x)
    torch.testing.assert_close(routing.weight, routing.logits.softmax(-1).gather(1, routing.index))


def test_aux_free_bias_updates_between_steps_under_activation_checkpointing(tmp_path: Path):
    """The update waits for the next forward: a checkpointed layer recomputes with the bias it used."""
    folder = remote_checkpoint(make_tiny("llama", tmp_path / "dense"), tmp_path / "remote", layers=[0, 2],
                               aux_free_bias=True, aux_free_update_rate=0.01)
    model = load(folder).train()
    model.activation_checkpointing_enable()
    bias = model.model.layers[0].mlp.router.expert_bias
    x = tokens()
    model(x, labels=x).loss.backward()
    assert bias.abs().sum() == 0  # not yet: backward recomputed this layer with the same bias
    model(x, labels=x).loss.backward()
    assert bias.abs().sum() > 0
    before = bias.clone()
    model.eval()  # flushes the last step's update
    assert not torch.equal(bias, before)


def test_jitter_noise_only_in_training():
    b = block(router_jitter_noise=0.5)
    x = torch.randn(9, 16)
    with torch.no_grad():
        b.eval()
        assert torch.equal(b(x), b(x))
        b.train()
        assert not torch.equal(b.route(x).logits, b.route(x).logits)


def test_training_after_inference_updates_what_inference_computes():
    """Inference packs expert weights (parameters become views of stacks); training must still work
    on them and the next inference must see the optimizer's update."""
    b = block(bias=True)
    x = torch.randn(20, 16)
    with torch.inference_mode():
        assert b.packable(x)
        first = b(x)
    storage = {e.up_proj.weight.untyped_storage().data_ptr() for e in b.experts}
    assert len(storage) == 1  # every expert's parameters now view one stack
    b.train()
    with torch.no_grad():
        torch.testing.assert_close(b(x), first)  # the packed path equals the module path
    optimizer = torch.optim.SGD(b.parameters(), lr=0.1)
    b(x).square().sum().backward()
    optimizer.step()
    b.eval()
    with torch.inference_mode():
        after = b(x)
    with torch.enable_grad():
        torch.testing.assert_close(after, b(x).detach())  # module path on the updated parameters
    assert not torch.allclose(after, first)


def test_packed_weights_follow_dtype_changes():
    b = block(bias=True)
    x = torch.randn(20, 16)
    with torch.inference_mode():
        b(x)
    b.double()  # new storage for every parameter: the stacks are dropped and rebuilt
    with torch.inference_mode():
        packed = b(x.double())
    assert b._packed[0].dtype == torch.float64
    torch.testing.assert_close(packed, b(x.double()).detach())  # against the module path


def test_model_built_from_a_config_alone_runs_and_generates():
    """The benchmark path: no checkpoint, the class imported from the package."""
    base = {"model_type": "llama"} | TINY["llama"]
    config = MoeifyConfig(base_config=base, moe=dict(moe_layers=[0, 1, 2], num_experts=4,
                                                     expert_intermediate_size=48))
    model = MoeifyForCausalLM(config).eval()
    assert all(p.isfinite().all() for p in model.parameters())
    out = greedy(model, tokens(length=5)[:1])
    assert out.shape == (1, 15)


@pytest.mark.parametrize("width", [6, 8])  # 6 float32 = 24-byte rows: grouped_mm refuses, the loop must serve
def test_grouped_product_any_width(width):
    from moeify.targets.remote_code.modeling_moeify import grouped_product

    torch.manual_seed(0)
    counts = [3, 0, 2]
    x, weight, bias = torch.randn(5, width), torch.randn(3, 7, width), torch.randn(3, 7)
    expected = torch.cat([x[:3] @ weight[0].T + bias[0], x[3:] @ weight[2].T + bias[2]])
    with torch.no_grad():
        assert torch.allclose(grouped_product(x, weight, bias, counts), expected, atol=1e-5)


# ---------------------------------------------------------------------------- the config refuses bad fields


LLAMA = {"model_type": "llama"} | TINY["llama"]  # 3 layers, 8 experts by default
BAD_FIELDS = [
    ({"num_experts": 0}, "moe.num_experts must be an integer >= 1, got 0"),
    ({"num_experts": 4.0}, "moe.num_experts must be an integer >= 1, got 4.0"),
    ({"num_experts": True}, "moe.num_experts must be an integer >= 1, got True"),
    ({"num_experts_per_tok": 0}, "moe.num_experts_per_tok must be an integer from 1 to 8 (num_experts), got 0"),
    ({"num_experts_per_tok": 9}, "moe.num_experts_per_tok must be an integer from 1 to 8 (num_experts), got 9"),
    ({"num_experts": 2, "num_experts_per_tok": 3}, "num_experts_per_tok must be an integer from 1 to 2"),
    ({"capacity_factor": -1.0}, "moe.capacity_factor must be null (no token dropping) or a finite number > 0"),
    ({"capacity_factor": 0}, "moe.capacity_factor must be null"),
    ({"capacity_factor": "2"}, "moe.capacity_factor must be null"),
    ({"capacity_factor": math.inf}, "moe.capacity_factor must be null"),
    ({"router_aux_loss_coef": -0.01}, "moe.router_aux_loss_coef must be a finite number >= 0, got -0.01"),
    ({"router_z_loss_coef": math.nan}, "moe.router_z_loss_coef must be a finite number >= 0, got nan"),
    ({"router_jitter_noise": 10**400}, "moe.router_jitter_noise must be a finite number >= 0"),
    ({"aux_free_update_rate": "fast"}, "moe.aux_free_update_rate must be a finite number >= 0"),
    ({"moe_layers": [3]}, "moe.moe_layers must list distinct layer indices from 0 to 2, got [3]"),
    ({"moe_layers": [-1]}, "moe.moe_layers must list distinct layer indices from 0 to 2"),
    ({"moe_layers": [0, 0]}, "moe.moe_layers must list distinct layer indices from 0 to 2"),
    ({"moe_layers": ["0"]}, "moe.moe_layers must list distinct layer indices from 0 to 2"),
    ({"moe_layers": "0,1"}, "moe.moe_layers must list distinct layer indices from 0 to 2"),
    ({"expert_intermediate_size": 0}, "moe.expert_intermediate_size must be an integer >= 1, got 0"),
    ({"shared_intermediate_size": 12.5}, "moe.shared_intermediate_size must be an integer >= 1, got 12.5"),
    ({"num_shared_experts": -1}, "moe.num_shared_experts must be an integer >= 0, got -1"),
    ({"hidden_act": "os.system"}, "moe.hidden_act must be a key of transformers' ACT2FN"),
    ({"gated": "yes"}, "moe.gated must be true or false, got 'yes'"),
    ({"scoring": "sigmoid"}, "moe.scoring must be one of ('softmax', 'unit')"),
    ({"mlp_path": "model.layers.{i.__class__}.mlp"}, "moe.mlp_path must be a dotted path of names with {i} once"),
    ({"mlp_path": "model.layers.{i:>999999999}.mlp"}, "moe.mlp_path must be a dotted path"),
    ({"mlp_path": "model.layers.{0}.mlp"}, "moe.mlp_path must be a dotted path"),
    ({"mlp_path": "model.layers.0.mlp"}, "moe.mlp_path must be a dotted path"),
    ({"mlp_path": "model.layers.{i}.{i}"}, "moe.mlp_path must be a dotted path"),
    ({"mlp_path": "model.layers{i}.mlp"}, "moe.mlp_path must be a dotted path"),
    ({"mlp_path": "model.__class__.{i}"}, "moe.mlp_path must be a dotted path"),
    ({"mlp_path": ["model", "{i}"]}, "moe.mlp_path must be a dotted path"),
]


@pytest.mark.parametrize("fields, message", BAD_FIELDS, ids=[str(f) for f, _ in BAD_FIELDS])
def test_each_bad_moe_field_is_refused_at_construction(fields: dict, message: str):
    with pytest.raises(ValueError) as error:
        MoeifyConfig(base_config=LLAMA, moe={"moe_layers": [0]} | fields)
    assert message in str(error.value) and "\n" not in str(error.value)
    assert len(str(error.value)) < 300  # whatever the field holds, the message stays one readable line


def test_moe_that_is_not_a_mapping_is_refused():
    with pytest.raises(ValueError, match="moe must be a mapping of MoE fields"):
        MoeifyConfig(base_config=LLAMA, moe=[0, 1])


def test_mlp_path_is_filled_by_replacement_not_format():
    config = MoeifyConfig(base_config=LLAMA, moe={"moe_layers": [2], "mlp_path": "model.layers.{i}.mlp"})
    assert config.mlp_path(2) == "model.layers.2.mlp"


NOT_AN_FFN = [
    ("llama", "model.layers.{i}.self_attn", "names model.layers.0.self_attn, a LlamaAttention: attention, not"),
    ("llama", "model.layers.{i}", "names model.layers.0, a LlamaDecoderLayer: holding attention (LlamaAttention)"),
    ("llama", "model.layers.{i}.input_layernorm", "a LlamaRMSNorm: not a feed-forward block"),
    ("llama", "model.layers.{i}.mlp.down_proj", "a Linear: not a feed-forward block"),
    ("llama", "model.layers.{i}.ffn", "names model.layers.0.ffn, which this LlamaForCausalLM does not have"),
    ("gpt2", "transformer.h.{i}.attn", "names transformer.h.0.attn, a GPT2Attention: attention"),
    ("gpt_neox", "gpt_neox.layers.{i}.attention", "a GPTNeoXAttention: attention"),
]


@pytest.mark.parametrize("family, path, message", NOT_AN_FFN, ids=[p for _, p, _ in NOT_AN_FFN])
def test_mlp_path_that_is_not_the_ffn_is_refused_at_construction(family: str, path: str, message: str):
    config = MoeifyConfig(base_config={"model_type": family} | TINY[family], moe={"moe_layers": [0], "mlp_path": path})
    with pytest.raises(ValueError) as error:
        MoeifyForCausalLM(config)
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("moe, message", [
    ({"num_experts_per_tok": 0}, "moe.num_experts_per_tok must be an integer from 1 to 4"),
    ({"mlp_path": "model.layers.{i}.self_attn"}, "a LlamaAttention: attention"),
], ids=["topk", "mlp_path"])
def test_loading_a_bad_remote_checkpoint_is_one_line(tmp_path: Path, capsys, moe: dict, message: str):
    """moeify's loaders turn the config's ValueError into one error line (exit 2), not a traceback."""
    from tests.fixtures import run_cli
    from tests.test_verify import with_tokenizer

    dense = with_tokenizer(make_tiny("llama", tmp_path / "dense"))
    folder = remote_checkpoint(dense, tmp_path / "remote")
    config = json.loads((folder / "config.json").read_text())
    config["moe"] |= moe
    (folder / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    assert run_cli("verify", dense, folder, "--tokens", 16) == 2
    err = capsys.readouterr().err.strip().splitlines()  # progress lines ("running ..."), then the error
    assert err[-1].startswith("error: ") and message in err[-1], err
    assert sum(line.startswith("error") for line in err) == 1 and "Traceback" not in "\n".join(err)
