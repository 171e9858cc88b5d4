"""Output formats: a registry of targets, each answering whether it can hold a conversion."""

from __future__ import annotations

from moeify.adapters import Adapter
from moeify.errors import MoeifyError
from moeify.spec import Format, Spec
from moeify.targets.base import Target
from moeify.targets.granite_moe import GraniteMoe, GraniteMoeShared
from moeify.targets.mixtral import Mixtral
from moeify.targets.qwen_moe import Qwen2Moe, Qwen3Moe
from moeify.targets.remote import Remote

NATIVE: dict[str, Target] = {t.name: t for t in (Mixtral(), Qwen2Moe(), Qwen3Moe(), GraniteMoe(), GraniteMoeShared())}
REMOTE = Remote()


def choose(adapter: Adapter, config: dict, spec: Spec, moe_layers: list[int]) -> tuple[Target, str]:
    """The target for a conversion and one line saying why it was chosen.

    auto takes the first native target (in the adapter's order) that holds the conversion
    exactly, and the remote format otherwise.
    """
    if spec.peer:
        from moeify.targets.peer import PEER  # here: PEER's code imports the remote modeling code (transformers)

        return PEER, "PEER layers exist only in moeify's remote format"
    if spec.format is Format.REMOTE:
        return REMOTE, "requested with --format remote"
    reasons = []
    for name in adapter.native:
        reason = NATIVE[name].refusal(adapter, config, spec, moe_layers)
        if reason is None:
            return NATIVE[name].prepared(adapter, config, spec), "native: it holds this conversion exactly"
        reasons.append(f"{name}: {reason}")
    why = "; ".join(reasons) or f"no native MoE architecture holds {adapter.model_type}"
    if spec.format is Format.NATIVE:
        raise MoeifyError(f"--format native cannot hold this conversion ({why}); use --format remote")
    return REMOTE, why
