"""One validated, frozen description of a requested conversion.

The CLI builds it, recipes build it, and the output's moeify.json records it, so a
conversion can be replayed exactly.
"""

from __future__ import annotations

import dataclasses
import math
import re
import reprlib
from dataclasses import dataclass, fields
from enum import Enum
from typing import Any, ClassVar

from moeify.errors import MoeifyError

# Upper bounds: generous for real use, and low enough that no spec makes a conversion allocate or
# loop without limit. A conversion plans ~3 tensors per expert per layer (1-2 KB and ~30 µs each),
# so 16384 experts in 32 layers is already ~1.5M planned tensors: a single-neuron split of a
# 14336-wide FFN fits, a billion experts does not.
MAX_EXPERTS = 16384  # experts per MoE layer, routed and shared (experts x granularity)
MAX_CALIBRATION_TOKENS = 2**20  # 170 times the default; the calibration text read for it is capped too
MAX_SEED = 2**63 - 1  # torch seeds are 64-bit
MAX_STD = 100  # noise and router std: ~1e4 times the usual, still far inside float16's range
MAX_SHARD = 10**12  # bytes (1TB)
# The numeric fields' upper bounds, checked (with types and finiteness) before fields are related.
LIMITS: dict[str, float | None] = {
    "experts": MAX_EXPERTS, "topk": MAX_EXPERTS, "granularity": MAX_EXPERTS, "shared_experts": MAX_EXPERTS,
    "seed": MAX_SEED, "calibration_tokens": MAX_CALIBRATION_TOKENS,
    "router_std": MAX_STD, "noise": MAX_STD, "drop_ratio": None,  # drop_ratio: [0, 1), checked below
}


class Mode(str, Enum):
    UPCYCLE = "upcycle"  # copy each FFN into experts
    SPLIT = "split"  # cut each FFN (or expert) into pieces
    MERGE = "merge"  # each expert's FFN from its own source model (fine-tunes of one base)
    EXPAND = "expand"  # grow a MoE by new routed experts


class Format(str, Enum):
    AUTO = "auto"  # native when a native architecture holds the result losslessly
    NATIVE = "native"  # a transformers MoE architecture (Mixtral, Qwen2-MoE, Qwen3-MoE)
    REMOTE = "remote"  # moeify's own modeling code shipped with the checkpoint


class RouterInit(str, Enum):
    RANDOM = "random"  # normal(0, router_std)
    ZEROS = "zeros"  # uniform routing at init


class Gate(str, Enum):
    """How a merge's routers start."""

    RANDOM = "random"  # normal(0, router_std)
    ZEROS = "zeros"  # uniform routing at init
    UNIFORM = "uniform"  # U(-1/sqrt(H), 1/sqrt(H)), nn.Linear's own initialisation
    HIDDEN = "hidden"  # per layer, from the base's FFN inputs on each expert's prompts
    CHEAP_EMBED = "cheap-embed"  # from the prompts' token embeddings, one row for every layer


class Partition(str, Enum):
    CONTIGUOUS = "contiguous"  # neurons in checkpoint order
    RANDOM = "random"  # a seeded random permutation, cut into equal parts
    CLUSTER = "cluster"  # balanced k-means over the neurons' weight vectors
    ACTIVATION = "activation"  # balanced clustering by co-activation on calibration text


class SplitRouter(str, Enum):
    CENTROID = "centroid"  # the mean gate (or up) row of the expert's neurons
    REPRESENTATIVE = "representative"  # the gate (or up) row of the neuron nearest that mean
    FIT = "fit"  # least squares on each expert's activation mass over calibration text


class DType(str, Enum):
    AUTO = "auto"  # keep each tensor's source dtype
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"


class Scoring(str, Enum):
    SOFTMAX = "softmax"  # softmax over router logits, top-k, renormalised over the top-k
    UNIT = "unit"  # each selected expert weighs 1: all pieces of a split selected = the dense FFN


class Retrieval(str, Enum):
    """What each PEER neuron's score vector is, before the grid approximates it."""

    UP = "up"  # its up row, scaled to its typical contribution: |u·x| large means the neuron matters (gated)
    FIT = "fit"  # least squares onto its share of each token's contribution mass (split's fitted router)
    ROWS = "rows"  # UP's scores exactly: heads own grid rows, a quota per row (queries 2-4x the up projection)


class Engine(str, Enum):
    ANY = "any"  # no engine in particular: the most portable construction; say which engines run it
    TRANSFORMERS = "transformers"
    LLAMACPP = "llamacpp"
    VLLM = "vllm"


@dataclass(frozen=True)
class Spec:
    peer: ClassVar[bool] = False  # PeerSpec (moeify.peer) says True; asking costs no import of PEER's code
    mode: Mode = Mode.UPCYCLE
    experts: int = 8  # copies of the FFN (before granularity)
    topk: int = 2  # copies selected per token (before granularity)
    granularity: int = 1  # each copy cut into this many pieces: experts*G experts, topk*G active
    shared_experts: int = 0  # always-on experts per MoE layer
    moe_layers: str = "all"  # which layers become MoE: all | every:N | skip-first:K | 0,2,4
    router_init: RouterInit = RouterInit.RANDOM
    router_std: float = 0.02  # std of a random router
    noise: float = 0.0  # std of Gaussian noise added to expert weights
    drop_ratio: float = 0.0  # Drop-Upcycling: share of each expert's neurons re-initialised
    seed: int = 0  # every random choice derives from it
    format: Format = Format.AUTO
    engine: Engine = Engine.ANY  # the engine the output must run in exactly (refused before writing if not)
    dtype: DType = DType.AUTO
    max_shard_size: str = "5GB"
    # split only: how neurons are grouped, how routers start, and the calibration text
    partition: Partition = Partition.ACTIVATION
    split_router: SplitRouter = SplitRouter.FIT
    calibration: str | None = None  # a file, dataset folder or Hub dataset name (moeify.documents); None: built-in
    calibration_tokens: int = 6144  # calibration tokens: the text's, topped up from the built-in corpus
    refit: bool = False  # least-squares down projections for the selected pieces (moeify.refit)
    # merge only (moeify.merge checks them): where each routed expert's FFN comes from with the prompts
    # that should reach it, the shared experts' sources, and how routers start
    expert_sources: list | None = None  # [{"source": str, "positive": [str], "negative": [str]}], one per expert
    shared_sources: list | None = None  # [{"source": str}], one per shared expert
    gate: Gate = Gate.RANDOM
    # expand only (moeify.expand checks them): routed experts added per MoE layer, where they come from
    add: int = 0
    expand_from: str | None = None  # a model folder or id, "copy:J", or "copy:busiest"
    freeze_old: bool = False  # record the old experts as frozen (config.json) for training

    def __post_init__(self) -> None:
        for f in fields(self):  # coerce strings from YAML/JSON/CLI into enums once, here
            if isinstance(f.default, Enum) and not isinstance(getattr(self, f.name), Enum):
                object.__setattr__(self, f.name, _enum(type(f.default), f.name, getattr(self, f.name)))
        self._validate()
        for f in fields(self):  # 1 and 1.0 are the same noise: store (and record) a float
            if isinstance(f.default, float):
                object.__setattr__(self, f.name, float(getattr(self, f.name)))

    def _validate(self) -> None:
        for f in fields(self):
            if f.name in LIMITS:
                _check_number(f.name, getattr(self, f.name), LIMITS[f.name], whole=isinstance(f.default, int))
        if self.mode is Mode.SPLIT:
            self._validate_split()
        elif self.refit:
            raise MoeifyError(f"refit belongs to a split (its pieces' down projections), not to "
                              f"{self.mode.value} recipes; drop it")
        elif self.experts < 2:
            raise MoeifyError(f"--experts must be at least 2 (got {self.experts})")
        elif not 1 <= self.topk <= self.experts:
            raise MoeifyError(f"--topk must be between 1 and --experts ({self.experts}) (got {self.topk})")
        if self.granularity < 1:
            raise MoeifyError(f"--granularity must be at least 1 (got {self.granularity})")
        if self.shared_experts < 0:
            raise MoeifyError(f"--shared-experts cannot be negative (got {self.shared_experts})")
        for flag, value in (("--router-std", self.router_std), ("--noise", self.noise)):
            if value < 0:
                raise MoeifyError(f"{flag} must be zero or positive (got {value})")
        if not 0 <= self.drop_ratio < 1:
            raise MoeifyError(f"--drop-ratio must be in [0, 1) (got {self.drop_ratio})")
        if self.seed < 0:
            raise MoeifyError(f"--seed must be between 0 and {MAX_SEED} (got {self.seed})")
        self._check_total()
        _check_shard_size(self.max_shard_size)
        parse_layers(self.moe_layers, None)
        if self.calibration is not None and not isinstance(self.calibration, str):
            raise MoeifyError(f"calibration must be a file path or a datasets name (got {_shown(self.calibration)})")

    def _check_total(self) -> None:
        total = self.experts * self.granularity + (self.shared_experts if self.mode is Mode.UPCYCLE else 0)
        if total > MAX_EXPERTS:
            parts = f"{self.experts} x granularity {self.granularity}" + (
                f" + {self.shared_experts} shared" if self.mode is Mode.UPCYCLE and self.shared_experts else "")
            raise MoeifyError(f"this spec makes {total} experts per MoE layer ({parts}); moeify makes at most "
                              f"{MAX_EXPERTS}: lower --experts or --granularity")

    def _validate_split(self) -> None:
        # experts counts the source's FFNs (1 for a dense source); topk counts pieces after the cut
        if self.experts < 1:
            raise MoeifyError(f"a split needs at least one source FFN per layer (experts={self.experts})")
        if self.granularity < 2:
            raise MoeifyError(f"--granularity must be at least 2 to split (got {self.granularity})")
        if self.shared_experts >= self.experts * self.granularity:
            raise MoeifyError(f"--shared-experts ({self.shared_experts}) must leave some of the "
                              f"{self.experts * self.granularity} pieces routed")
        if not 1 <= self.topk <= self.routed_experts:
            raise MoeifyError(f"--topk must be between 1 and the {self.routed_experts} routed experts (got {self.topk})")
        if self.calibration_tokens < 16:
            raise MoeifyError(f"--calibration-tokens must be at least 16 (got {self.calibration_tokens})")
        if not isinstance(self.refit, bool):
            raise MoeifyError(f"refit must be true or false (got {_shown(self.refit)})")
        if self.refit and self.shared_experts == 0 and self.topk >= self.routed_experts:
            raise MoeifyError("--refit repays what unselected pieces would add, and here every piece is selected "
                              "(the split is exact); lower --topk or drop --refit")

    @property
    def routed_experts(self) -> int:
        if self.mode is Mode.SPLIT:  # shared experts are carved out of the pieces
            return self.experts * self.granularity - self.shared_experts
        return self.experts * self.granularity

    @property
    def active_experts(self) -> int:
        return self.topk if self.mode is Mode.SPLIT else self.topk * self.granularity

    def layers(self, num_layers: int) -> list[int]:
        return parse_layers(self.moe_layers, num_layers)

    def replace(self, **changes: Any) -> Spec:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], also: tuple[str, ...] = ()) -> Spec:
        """also: other fields the caller took out of data already (a recipe's source and train), named
        among the known ones when a field is unknown."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise MoeifyError(f"unknown conversion field(s) {', '.join(unknown)}; known: "
                              f"{', '.join(sorted(known | set(also)))}")
        return cls(**data)


def parse_layers(expr: str, num_layers: int | None) -> list[int]:
    """Resolve --moe-layers against a model depth (None only checks the syntax)."""
    expr = str(expr).strip().replace(" ", "")
    n = num_layers if num_layers is not None else 1  # a syntax check needs no real depth
    try:
        if expr == "all":
            chosen = list(range(n))
        elif expr.startswith("every:"):
            step = int(expr.split(":", 1)[1])
            # Sparse upcycling converts every other layer, counting from the second.
            chosen = list(range(step - 1, n, step)) if step >= 1 else []
        elif expr.startswith("skip-first:"):
            chosen = list(range(int(expr.split(":", 1)[1]), n))
        else:
            chosen = sorted({int(part) for part in expr.split(",")})
    except ValueError:
        raise MoeifyError(f"cannot read --moe-layers {expr!r}; use all, every:2, skip-first:1 or 0,2,4") from None
    if num_layers is not None:
        bad = [i for i in chosen if not 0 <= i < num_layers]
        if bad:
            raise MoeifyError(f"--moe-layers names layer {bad[0]}, but the model has layers 0..{num_layers - 1}")
        if not chosen:
            raise MoeifyError(f"--moe-layers {expr!r} selects no layer of this {num_layers}-layer model")
    return chosen


def _check_number(name: str, value: Any, high: float | None, whole: bool) -> None:
    """A number of the right kind, finite, and at most `high`: one line naming the flag otherwise."""
    flag = "--" + name.replace("_", "-")
    kinds = (int,) if whole else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise MoeifyError(f"{flag} must be {'a whole number' if whole else 'a number'} (got {_shown(value)})")
    if isinstance(value, float) and not math.isfinite(value):
        raise MoeifyError(f"{flag} must be a finite number (got {value})")
    if high is not None and value > high:  # an int compares exactly with a float, however large
        raise MoeifyError(f"{flag} must be at most {high} (got {_shown(value)})")


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """'5GB' -> 5_000_000_000, as transformers reads max_shard_size."""
    match = _SIZE.match(str(text))
    if not match or float(match.group(1)) <= 0:
        raise MoeifyError(f"cannot read size {text!r}; write it like 5GB, 500MB or 2GiB")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "B").upper()])


def _check_shard_size(text: str) -> None:
    try:
        size = parse_size(text)
    except OverflowError:  # more digits than a float holds: over any bound
        size = MAX_SHARD + 1
    if size > MAX_SHARD:
        raise MoeifyError(f"--max-shard-size must be at most 1TB (got {_shown(text)})")


def _shown(value: Any) -> str:
    """A value for an error line: a 4000-digit number or a long list is cut short."""
    if isinstance(value, int) and value.bit_length() > 1000:  # str() refuses ints past 4300 digits
        return "a number over 10**300"
    return reprlib.repr(value)


def _enum(kind: type[Enum], name: str, value: Any) -> Enum:
    try:
        return kind(value)
    except ValueError:
        choices = "|".join(member.value for member in kind)
        raise MoeifyError(f"unknown {name} {value!r}; choose one of {choices}") from None


def _plain(value: Any) -> Any:
    return value.value if isinstance(value, Enum) else value
