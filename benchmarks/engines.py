"""Run moeify's native outputs in llama.cpp and check moeify.engines' claims for it.

Each case converts a tiny model (a real tokenizer, SmolLM2's, so llama.cpp's converter accepts
it), converts the output to GGUF (f32) with llama.cpp's own convert_hf_to_gguf.py, runs it with
llama-cpp-python (f32 KV cache, logits at every position) and compares it with transformers on
the same output (the engine claim) and on the dense source, or the MoE source of a split
(moeify's exactness): max |logit difference| over 12 tokens and 12 greedily decoded tokens.
A ✓ claim holds when llama.cpp's logits agree with transformers' within 1e-4 and the greedy
tokens are the same; a ✗ claim holds when the conversion or the load fails, or the numbers differ.
Cases marked "edited" change one thing in a ✓ output by hand (a zero gate, tied embeddings,
no shared expert) to check a table row no moeify construction writes any more.

--dtypes measures the shared-expert gate construction: a negligible constant gate row against
an exactly zero one (sigmoid 0.5 to the last bit), in transformers at float32, bfloat16 and
float16; and the same output in llama.cpp from f32, bf16 and f16 GGUF files.

Needs, besides moeify's test extra (`pip install -e ".[test]"`), two packages that are not
moeify dependencies:

    pip install llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl sentencepiece
    (or `pip install llama-cpp-python==0.3.36 sentencepiece`, which builds llama.cpp: ~20 min)

The converter ships only in llama-cpp-python's source distribution; it is fetched once into
~/.cache/moeify/engines with `pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36`
and run with its own gguf-py (the converter puts it first on sys.path).

    python benchmarks/engines.py [--cases NAME ...] [--dtypes] [--workdir DIR] [--table]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests.fixtures: the tiny models of the test suite

from moeify import engines  # noqa: E402
from moeify.conversion import convert  # noqa: E402
from moeify.spec import Engine, Spec  # noqa: E402
from tests.fixtures import make_tiny  # noqa: E402

VERSION = "0.3.36"
CACHE = Path.home() / ".cache" / "moeify" / "engines"
VENDOR = f"llama_cpp_python-{VERSION}/vendor/llama.cpp"
TOKENS = [1, 17, 42, 5, 99, 160, 7, 23, 64, 3, 150, 88]
PROMPT, NEW_TOKENS = TOKENS[:4], 12
ATOL = 1e-4
SKIP = "llama.cpp check skipped"


class Missing(RuntimeError):
    """A tool the check needs is not installed; the message says how to get it."""


# ---------------------------------------------------------------------------- tools


def require_llama_cpp():
    try:
        import llama_cpp  # noqa: F401
        import sentencepiece  # noqa: F401  (the converter imports it for Llama vocabularies)
    except ImportError as e:
        raise Missing(f"{SKIP}: {e.name} is not installed; pip install "
                      f"llama_cpp_python-{VERSION}-py3-none-linux_x86_64.whl sentencepiece (a prebuilt wheel), "
                      f"or pip install llama-cpp-python=={VERSION} sentencepiece (builds llama.cpp, ~20 min)") from None
    return llama_cpp


def converter() -> Path:
    """llama.cpp's convert_hf_to_gguf.py from llama-cpp-python's sdist, fetched and unpacked once."""
    script = CACHE / VENDOR / "convert_hf_to_gguf.py"
    if script.is_file():
        return script
    CACHE.mkdir(parents=True, exist_ok=True)
    sdist = CACHE / f"llama_cpp_python-{VERSION}.tar.gz"
    if not sdist.is_file():
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                               f"llama-cpp-python=={VERSION}", "-d", str(CACHE)], capture_output=True, text=True)
        if done.returncode or not sdist.is_file():
            raise Missing(f"{SKIP}: cannot fetch llama-cpp-python=={VERSION}'s source distribution "
                          f"({done.stderr.strip().splitlines()[-1:]}); the converter ships only there")
    wanted = (f"{VENDOR}/convert_hf_to_gguf.py", f"{VENDOR}/conversion/", f"{VENDOR}/gguf-py/")
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(wanted)]
        tar.extractall(CACHE, members=members, filter="data")
    return script


def tokenizer_dir() -> Path:
    """SmolLM2's tokenizer files (moeify's offline fallback source): a vocabulary llama.cpp accepts."""
    from moeify.source import fallback_smollm2

    return fallback_smollm2(notify=lambda line: None)


def tiny(family: str, folder: Path, **overrides) -> Path:
    """A tiny model of the test suite, with SmolLM2's 49152-token vocabulary and tokenizer."""
    fields = {"vocab_size": 49152, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2} | overrides
    make_tiny(family, folder, **fields)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir() / name, folder / name)
    return folder


def to_gguf(folder: Path, outtype: str = "f32") -> Path | str:
    """The GGUF file of a checkpoint folder, or the converter's last error line."""
    out = folder.with_name(f"{folder.name}.{outtype}.gguf")
    done = subprocess.run([sys.executable, str(converter()), str(folder), "--outtype", outtype, "--outfile", str(out)],
                          capture_output=True, text=True)
    if done.returncode:
        return "convert: " + (done.stderr.strip().splitlines() or ["failed"])[-1][:160]
    return out


def llama_cpp_run(gguf: Path) -> tuple[np.ndarray, list[int]] | str:
    """(logits at every position of TOKENS, greedy continuation of PROMPT), or why it did not load."""
    llama_cpp = require_llama_cpp()
    f32 = 0  # GGML_TYPE_F32: an f16 KV cache alone moves logits by ~1e-4
    try:
        llm = llama_cpp.Llama(str(gguf), n_ctx=64, n_threads=1, logits_all=True, verbose=False,
                              type_k=f32, type_v=f32)
    except ValueError as e:
        return f"load: {e}"
    llm.eval(TOKENS)
    logits = np.array(llm.scores[: len(TOKENS)])
    llm.reset()
    llm.eval(PROMPT)
    greedy = []
    for _ in range(NEW_TOKENS):
        greedy.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval(greedy[-1:])
    return logits, greedy


def transformers_run(folder: Path, dtype: torch.dtype = torch.float32) -> tuple[np.ndarray, list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    with torch.no_grad():
        logits = model(torch.tensor([TOKENS])).logits[0].float().numpy()
        out = model.generate(torch.tensor([PROMPT]), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=2)
    return logits, out[0, len(PROMPT):].tolist()


# ---------------------------------------------------------------------------- edits of an output


def edit_tensors(folder: Path, change: Callable[[dict], None]) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def edit_config(folder: Path, **fields) -> None:
    path = folder / "config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | fields, indent=2))


def zero_gate(folder: Path) -> None:
    edit_tensors(folder, lambda t: [v.zero_() for k, v in t.items() if k.endswith("shared_expert_gate.weight")])


def tie_embeddings(folder: Path) -> None:
    edit_tensors(folder, lambda t: t.pop("lm_head.weight"))
    edit_config(folder, tie_word_embeddings=True)


def no_shared_expert(folder: Path) -> None:
    def drop(tensors: dict) -> None:
        for name in [k for k in tensors if ".shared_expert." in k]:
            rows, columns = tensors[name].shape
            tensors[name] = tensors[name].new_zeros((rows, 0) if name.endswith("down_proj.weight") else (0, columns))
    edit_tensors(folder, drop)
    edit_config(folder, shared_expert_intermediate_size=0)


# ---------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    name: str
    family: str  # the dense source's family
    spec: dict  # the conversion (upcycle), or for a split the upcycle that makes its MoE source
    claim: str  # which table row it checks
    source: dict = field(default_factory=dict)  # overrides of the tiny source's config
    split: int = 0  # > 0: split the upcycled MoE into this many pieces per expert
    edit: Callable[[Path], None] | None = None  # a hand edit of the output (table rows no construction writes)
    random_router: bool = False  # before a split: replace a zero router by a random one (a trained-like MoE)


ZEROS = {"router_init": "zeros"}  # with --granularity 1: uniform routing, exact without renormalising
# head_dim 16 = 64 / 4 heads: what llama.cpp's qwen2moe and vLLM's qwen2_moe assume.
PLAIN_HEADS = {"head_dim": 16}
# Llama 3.x's rope scaling, strong enough (original context 16) to change 12 tokens' logits.
LLAMA3_ROPE = {"rope_parameters": {"rope_type": "llama3", "rope_theta": 5000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 16}}

CASES = [
    Case("mixtral", "llama", {"experts": 4, "topk": 2, "router_std": 0.5}, "Mixtral renormalises, tied embeddings",
         PLAIN_HEADS),
    Case("mixtral-head-dim", "llama", {"experts": 4, "topk": 2, "router_std": 0.5}, "Mixtral head_dim 24 ≠ 64/4"),
    Case("mixtral-granular", "llama", {"experts": 4, "topk": 2, "granularity": 2, "router_std": 0.5},
         "granularity (virtual groups)", PLAIN_HEADS),
    Case("mixtral-split", "llama", {"experts": 4, "topk": 2, "router_std": 0.5}, "split of a Mixtral", PLAIN_HEADS,
         split=2),
    Case("mixtral-llama3-rope", "llama", {"experts": 4, "topk": 2, "router_std": 0.5}, "llama3 rope scaling",
         PLAIN_HEADS | LLAMA3_ROPE),
    Case("mixtral-sliding", "mistral", {"experts": 4, "topk": 2, "router_std": 0.5}, "sliding window (8 tokens)",
         ),
    Case("qwen2moe-shared", "llama", {"experts": 4, "topk": 2, "shared_experts": 2, **ZEROS},
         "shared experts, uniform routing, explicit lm_head, gate row ≠ 0, zero q/k/v biases", PLAIN_HEADS),
    Case("qwen2moe-qwen2", "qwen2", {"experts": 4, "topk": 2, **ZEROS},
         "no shared experts (1 zero neuron), q/k/v biases"),
    Case("qwen2moe-random-router", "llama", {"experts": 4, "topk": 2, "shared_experts": 1, "router_std": 0.5},
         "norm_topk_prob true (renormalised)", PLAIN_HEADS),
    Case("qwen2moe-layers", "llama", {"experts": 4, "topk": 2, "moe_layers": "skip-first:1", **ZEROS},
         "dense layers (mlp_only_layers)", PLAIN_HEADS),
    Case("qwen2moe-granular", "llama", {"experts": 4, "topk": 2, "granularity": 2, "shared_experts": 1,
                                        "router_std": 0.5}, "granularity (needs renormalisation)", PLAIN_HEADS),
    Case("qwen2moe-head-dim", "llama", {"experts": 4, "topk": 2, "shared_experts": 1, **ZEROS}, "head_dim 24 ≠ 64/4"),
    Case("qwen2moe-llama3-rope", "llama", {"experts": 4, "topk": 2, "shared_experts": 1, **ZEROS},
         "llama3 rope scaling", PLAIN_HEADS | LLAMA3_ROPE),
    Case("qwen2moe-sliding", "mistral", {"experts": 4, "topk": 2, "shared_experts": 1, **ZEROS},
         "sliding window (8 tokens)"),
    Case("qwen2moe-zero-gate", "llama", {"experts": 4, "topk": 2, "shared_experts": 1, **ZEROS},
         "edited: shared-expert gate row 0", PLAIN_HEADS, edit=zero_gate),
    Case("qwen2moe-tied", "llama", {"experts": 4, "topk": 2, "shared_experts": 1, **ZEROS},
         "edited: tied embeddings, no lm_head.weight", PLAIN_HEADS, edit=tie_embeddings),
    Case("qwen2moe-no-shared", "qwen2", {"experts": 4, "topk": 2, **ZEROS}, "edited: shared expert of width 0",
         edit=no_shared_expert),
    Case("qwen2moe-split", "llama", {"experts": 4, "topk": 2, "shared_experts": 1, **ZEROS},
         "split of a Qwen2-MoE (random router, no renormalisation)", PLAIN_HEADS, split=2, random_router=True),
    Case("granitemoe", "granite", {"experts": 4, "topk": 2, "router_std": 0.5},
         "Granite-MoE: fused experts, multipliers", {"mlp_bias": False}),
    Case("granitemoeshared", "granite", {"experts": 4, "topk": 2, "granularity": 2, "shared_experts": 2,
                                         "router_std": 0.5}, "Granite-MoE-Shared: ungated shared MLP, granularity",
         {"mlp_bias": False}),
    Case("qwen3moe", "qwen3", {"experts": 4, "topk": 2, "router_std": 0.5}, "Qwen3-MoE renormalises, tied embeddings"),
    Case("qwen3moe-layers", "qwen3", {"experts": 4, "topk": 2, "router_std": 0.5, "moe_layers": "1"},
         "dense layers (mlp_only_layers)"),
    Case("qwen3moe-split", "qwen3", {"experts": 4, "topk": 2, "router_std": 0.5}, "split of a Qwen3-MoE", split=2),
]


@dataclass
class Row:
    case: Case
    target: str
    claim: engines.Verdict  # moeify's verdict for llama.cpp (recorded, or for an edited output, recomputed)
    exactness: float  # max |transformers(output) - transformers(reference)|
    engine_gap: float | str  # max |llama.cpp(output) - transformers(output)|, or why it did not run
    greedy_same: bool

    @property
    def ran_exactly(self) -> bool:
        return isinstance(self.engine_gap, float) and self.engine_gap < ATOL and self.greedy_same

    @property
    def holds(self) -> bool:
        return self.ran_exactly == self.claim.exact


def build(case: Case, work: Path) -> tuple[Path, Path, str]:
    """(output folder, reference folder, target) of a case: the conversion, its split, its edit."""
    source = tiny(case.family, work / "dense", **case.source)
    upcycled = work / "moe"
    result = convert(source, upcycled, Spec(**case.spec), source=str(source))
    output, reference = upcycled, source
    if case.split:
        if case.random_router:
            edit_tensors(upcycled, lambda t: [v.copy_(torch.randn_like(v) * 0.5) for k, v in t.items()
                                              if k.endswith("mlp.gate.weight")])
        result = _split(upcycled, work / "split", case.split)
        output, reference = work / "split", upcycled
    if case.edit:
        case.edit(output)
    return output, reference, result.target


def _split(source: Path, output: Path, granularity: int):
    from moeify.moe_source import moe_source_for
    from moeify.spec import Mode
    from moeify.split import split_moe

    config = json.loads((source / "config.json").read_text())
    moe = moe_source_for(config)
    layers = ",".join(map(str, moe.moe_layers(config)))
    spec = Spec(mode=Mode.SPLIT, experts=moe.count, granularity=granularity, topk=moe.topk(config) * granularity,
                moe_layers=layers if len(moe.moe_layers(config)) < moe.num_layers(config) else "all")
    return convert(source, output, spec, source=str(source), transform=split_moe, adapter=moe)


def check(case: Case, work: Path) -> Row:
    output, reference, target = build(case, work)
    recorded = json.loads((output / "moeify.json").read_text())["engines"]
    claim = next(v for v in engines.from_record(recorded) if v.engine is Engine.LLAMACPP)
    if case.edit:  # the output is no longer what moeify wrote: ask the table about the edited config
        config = json.loads((output / "config.json").read_text())
        claim = next(v for v in engines.verdicts(config, Spec()) if v.engine is Engine.LLAMACPP)
        if case.edit is zero_gate:  # a weight, not a config field: the table's shared_gate_at_zero row
            claim = engines.Verdict(Engine.LLAMACPP, engines.honours(Engine.LLAMACPP, target).shared_gate_at_zero,
                                    f"{target}: sigmoid of a zero gate logit")
    ours, ours_greedy = transformers_run(output)
    exactness = float(np.abs(ours - transformers_run(reference)[0]).max())
    gguf = to_gguf(output)
    ran = llama_cpp_run(gguf) if isinstance(gguf, Path) else gguf
    if isinstance(ran, str):
        return Row(case, target, claim, exactness, ran, False)
    logits, greedy = ran
    gap = float(np.abs(logits - ours).max()) if np.isfinite(logits).all() else "NaN logits"
    return Row(case, target, claim, exactness, gap, greedy == ours_greedy)


# ---------------------------------------------------------------------------- dtypes


def gate_dtypes(work: Path) -> list[str]:
    """The negligible gate row against a zero one, per dtype, in transformers and llama.cpp."""
    source = tiny("llama", work / "dense", **PLAIN_HEADS)
    lines = ["| engine | dtype | gate row c vs gate row 0 (max abs logit) "
             "| gate row c vs the dense source, same dtype |", "|---|---|---|---|"]
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        name = str(dtype).removeprefix("torch.")
        out = work / f"moe-{name}"
        convert(source, out, Spec(experts=4, topk=2, shared_experts=1, dtype=name, **ZEROS), source=str(source))
        zero = work / f"moe-{name}-zero-gate"
        shutil.copytree(out, zero)
        zero_gate(zero)
        tiny_gate = transformers_run(out, dtype)[0]
        gap = np.abs(tiny_gate - transformers_run(zero, dtype)[0]).max()
        dense = np.abs(tiny_gate - transformers_run(source, dtype)[0]).max()
        lines.append(f"| transformers | {name} | {gap:.1e} | {dense:.1e} |")  # both in this dtype
    for outtype, name in (("f32", "float32"), ("bf16", "bfloat16"), ("f16", "float16")):
        dense = llama_cpp_run(to_gguf(source, outtype))[0]
        gaps = []
        for out in (work / f"moe-{name}", work / f"moe-{name}-zero-gate"):
            ran = llama_cpp_run(to_gguf(out, outtype))
            gaps.append(ran if isinstance(ran, str) else _gap(ran[0], dense))
        lines.append(f"| llama.cpp | {outtype} GGUF of the {name} output | gate 0: {gaps[1]} | {gaps[0]} |")
    return lines


def _gap(logits: np.ndarray, reference: np.ndarray) -> str:
    return f"{np.abs(logits - reference).max():.1e}" if np.isfinite(logits).all() else "NaN logits"


# ---------------------------------------------------------------------------- report


def support_table() -> list[str]:
    """moeify.engines.TABLE as markdown: what each engine's implementation honours."""
    columns = [("renormalise", "top-k renormalisation"), ("dense_layers", "dense layers"),
               ("tied_embeddings", "tied embeddings"), ("qkv_bias", "q/k/v biases"), ("head_dim", "head_dim"),
               ("sliding_window", "sliding window"), ("rope_types", "rope scaling"),
               ("shared_gate_at_zero", "gate logit 0"), ("shared_width_zero", "shared width 0")]
    lines = ["| engine | architecture | " + " | ".join(t for _, t in columns) + " | read from |",
             "|---" * (len(columns) + 3) + "|"]
    for (engine, arch), h in engines.TABLE.items():
        if engine is Engine.TRANSFORMERS:
            continue
        cells = [("—" if f in ABSENT.get(arch, ()) else _cell(getattr(h, f))) for f, _ in columns] if h.runs \
            else ["no implementation"] + [""] * (len(columns) - 1)
        lines.append(f"| {engines.NAMES[engine]} | {arch} | " + " | ".join(cells) + f" | {h.read_from} |")
    return lines


# Features a transformers architecture does not have at all ("—" in the table).
_NO_SHARED_GATE = {"shared_gate_at_zero", "shared_width_zero"}
ABSENT = {
    "mixtral": {"dense_layers", "qkv_bias"} | _NO_SHARED_GATE,
    "qwen3_moe": _NO_SHARED_GATE,
    "granitemoe": {"dense_layers", "head_dim", "sliding_window"} | _NO_SHARED_GATE,
    "granitemoeshared": {"dense_layers", "head_dim", "sliding_window"} | _NO_SHARED_GATE,
}


def _cell(value) -> str:
    if value is None or isinstance(value, frozenset):  # rope scaling types: None is every one
        missing = sorted(engines.LLAMACPP_ROPE - (value or engines.LLAMACPP_ROPE))
        return "✗ " + ", ".join(missing) if missing else "✓"
    return ("✓" if value else "✗") if isinstance(value, bool) else value.value


def results_table(rows: list[Row]) -> list[str]:
    lines = ["| case | output | what it checks | moeify says (llama.cpp) | transformers vs reference "
             "| llama.cpp vs transformers | greedy 12 tokens | claim holds |", "|---" * 8 + "|"]
    for r in rows:
        gap = f"{r.engine_gap:.1e}" if isinstance(r.engine_gap, float) else r.engine_gap
        said = "✓" if r.claim.exact else f"✗ {r.claim.reason.split(': ', 1)[-1]}"
        lines.append(f"| {r.case.name} | {r.target} | {r.case.claim} | {said} | {r.exactness:.1e} | {gap} "
                     f"| {'same' if r.greedy_same else 'differs'} | {'yes' if r.holds else 'NO'} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="*", help="Run only these cases (default: all).")
    parser.add_argument("--dtypes", action="store_true", help="Also measure the shared-expert gate per dtype.")
    parser.add_argument("--table", action="store_true", help="Only print the engine table (no runs).")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("\n".join(support_table()) + "\n")
    if args.table:
        return
    try:
        require_llama_cpp()
        converter()
    except Missing as e:
        sys.exit(str(e))
    cases = [c for c in CASES if not args.cases or c.name in args.cases]
    rows = []
    with tempfile.TemporaryDirectory(prefix="moeify-engines-", dir=args.workdir) as tmp:
        for case in cases:
            rows.append(check(case, Path(tmp) / case.name))
            print(results_table(rows[-1:])[-1], flush=True)
        print("\n" + "\n".join(results_table(rows)))
        if args.dtypes:
            print("\n" + "\n".join(gate_dtypes(Path(tmp) / "dtypes")))
    held = sum(r.holds for r in rows)
    print(f"\n{held} of {len(rows)} claims hold")
    sys.exit(0 if held == len(rows) else 1)


if __name__ == "__main__":
    main()
