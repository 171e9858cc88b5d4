"""Output formats: a registry of targets, each answering whether it can hold a conversion."""

from __future__ import annotations

from moeify.adapters import Adapter
from moeify.errors import MoeifyError
from moeify.spec import Format, Spec
from moeify.targets.base import Target
from moeify.targets.mixtral import Mixtral

NATIVE: dict[str, Target] = {t.name: t for t in (Mixtral(),)}


def choose(adapter: Adapter, config: dict, spec: Spec, moe_layers: list[int]) -> tuple[Target, str]:
    """The target for a conversion and one line saying why it was chosen."""
    reasons = []
    for name in adapter.native:
        target = NATIVE.get(name)
        if target is None:
            continue
        reason = target.refusal(adapter, config, spec, moe_layers)
        if reason is None:
            return target, f"native {name}: it holds this conversion exactly"
        reasons.append(f"{name}: {reason}")
    why = "; ".join(reasons) or f"no native MoE architecture holds {adapter.model_type}"
    if spec.format is Format.NATIVE or spec.format is Format.AUTO:
        # The remote format arrives with its own modeling code; until then, refuse clearly.
        raise MoeifyError(f"no native format can hold this conversion ({why}); change the options")
    raise MoeifyError(f"--format {spec.format.value} is not available yet; use --format native")
