"""PEER layers on disk: moeify's remote format with a `peer` config section instead of MoE blocks.

Same code files, same family tensors; each converted FFN becomes a PeerBlock (see
remote_code/modeling_moeify.py for the tensor names and shapes written here).
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, PretrainedConfig

from moeify.adapters import Adapter
from moeify.peer import PeerLayer, PeerSpec
from moeify.spec import Spec
from moeify.targets.base import PROJ_NAMES, LayerTensor, dtype_name, ffn_tensors
from moeify.targets.remote import NOT_BASE, Remote

# PeerBlock parameter names of the slot-ordered neuron tables, by FFN role (down is stored as rows).
ROW_NAMES = {"gate": "gate_rows", "up": "up_rows", "gate_bias": "gate_bias", "up_bias": "up_bias"}
NORM_NAMES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


class Peer(Remote):
    name = "remote"  # the remote format, which is what the card and the summary should say

    def moe_tensors(self, adapter: Adapter, layer: int, peer: PeerLayer) -> list[LayerTensor]:
        base = adapter.mlp_path(layer)
        tensors: list[LayerTensor] = [(f"{base}.query.weight", lambda p: p.query)]
        if peer.query_norm is not None:
            tensors += [(f"{base}.query_norm.{k}", lambda p, k=k: p.query_norm[k]) for k in NORM_NAMES]
        tensors.append((f"{base}.sub_keys", lambda p: p.sub_keys))
        for role in peer.neurons.tensors():
            name = ROW_NAMES.get(role)
            if name is not None:
                tensors.append((f"{base}.{name}", lambda p, role=role: getattr(p.neurons, role)))
        tensors.append((f"{base}.down_rows", lambda p: p.neurons.down.T.contiguous()))
        if peer.shared is not None:
            names = {role: PROJ_NAMES[role] for role in peer.shared.tensors()}
            tensors += ffn_tensors(f"{base}.shared", names, lambda p: p.shared)
        if peer.output_bias is not None:
            tensors.append((f"{base}.output_bias", lambda p: p.output_bias))
        return tensors

    def config(self, adapter: Adapter, config: dict, spec: Spec, moe_layers: list[int], peer: PeerLayer,
               dtype: torch.dtype) -> PretrainedConfig:
        from moeify.targets.remote_code.configuration_moeify import MoeifyConfig

        assert isinstance(spec, PeerSpec), "the PEER target writes PEER conversions only"
        base = {k: v for k, v in AutoConfig.for_model(**config).to_dict().items() if k not in NOT_BASE}
        base["dtype"] = dtype_name(dtype)
        section = {
            "mlp_path": adapter.mlp,
            "peer_layers": list(moe_layers),
            "num_neurons": spec.routed_experts,
            "num_sub_keys": peer.sub_keys.shape[2],
            "num_heads": peer.heads,
            "num_neurons_per_head": peer.topk,
            "key_dim": 2 * peer.sub_keys.shape[3],
            "num_shared_neurons": 0 if peer.shared is None else peer.shared.intermediate_size,
            "hidden_act": adapter.activation(config),
            "gated": adapter.gated,
            "bias": adapter.bias,
            "output_bias": peer.output_bias is not None,
            "scoring": spec.scoring.value,
            "query_norm": peer.query_norm is not None,
            "magnitude": peer.magnitude,
        }
        out = MoeifyConfig(base_config=base, moe={"mlp_path": adapter.mlp, "moe_layers": []}, peer=section,
                           dtype=dtype_name(dtype))
        out.architectures = ["MoeifyForCausalLM"]
        out.auto_map = {"AutoConfig": "configuration_moeify.MoeifyConfig",
                        "AutoModelForCausalLM": "modeling_moeify.MoeifyForCausalLM"}
        return out


PEER = Peer()
