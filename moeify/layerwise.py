"""Running a causal LM one decoder layer at a time, straight from its checkpoint.

Calibration and verify need activations, not a model in memory. The model is built on the meta
device (accelerate's init_empty_weights: shapes, no data); its own forward runs once with every
decoder layer replaced by a catcher that records what the layer is called with (hidden states,
attention mask, rotary position embeddings, position ids: whatever this family computes, computed
by its own code). Then layer L alone is read from the checkpoint in float32 (through transformers'
own loading, so renamed and fused tensors land where they would in from_pretrained), every batch's
hidden states go through it, and it is dropped before layer L+1 is read. The model's forward runs
once more at the end with the layers replaced by the final hidden states, which gives the logits.

Peak memory: the embeddings (or the final norm and head), one layer, and the hidden states of
the tokens, whatever the depth.
"""

from __future__ import annotations

import copy
import ctypes
import re
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from moeify.checkpoint import Checkpoint
from moeify.errors import MoeifyError
from moeify.loading import Code, code_of, quiet_transformers


@dataclass
class Batch:
    """One batch between layers: token ids (B, T), hidden states (B, T, H) and each layer's call."""

    ids: torch.Tensor
    hidden: torch.Tensor | None = None
    calls: dict[int, tuple[tuple, dict]] | None = None  # layer -> (args after the hidden states, kwargs)


class _Stop(Exception):
    """Raised by the last catcher: the rest of the forward (norm, head) is not needed yet."""


class _Catcher(nn.Module):
    """Stands in for decoder layer `index`: records its call and passes the hidden states on."""

    def __init__(self, layer: nn.Module, index: int, batch: Batch, last: bool):
        super().__init__()
        self.__dict__.update(layer=layer, index=index, batch=batch, last=last)  # not registered as children

    def __getattr__(self, name: str):  # the model may read a layer's attributes (attention_type)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["layer"], name)

    def forward(self, hidden: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.index == 0:
            self.batch.hidden = hidden
        self.batch.calls[self.index] = (args, kwargs)
        if self.last:
            raise _Stop
        return hidden


class _Feeder(_Catcher):
    """Stands in for a decoder layer at the end: the first returns the batch's final hidden states."""

    def forward(self, hidden: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.batch.hidden if self.index == 0 else hidden


class LayerwiseModel:
    """A causal LM whose weights stay on disk until one layer at a time is needed (see the module doc).

    model: the whole module tree on the meta device, with real weights only where loaded.
    """

    def __init__(self, folder: Path, code: Code | None = None):
        from transformers.conversion_mapping import get_model_conversion_mapping

        self.folder = Path(folder)
        self.code = code_of(self.folder) if code is None else code
        map_large_blocks()
        self.model = _skeleton(self.folder, self.code)
        self.ckpt = Checkpoint(self.folder)
        self.path, self.layers = _decoder_layers(self.model)
        self.mapping = get_model_conversion_mapping(self.model)
        head, embeddings = self.model.get_output_embeddings(), self.model.get_input_embeddings()
        self.tied = head is None or head.weight is embeddings.weight  # known now: dropping weights unties them
        self.layer_names = _names_by_layer(self.ckpt.names(), self.path.rpartition(".")[2], len(self.layers))
        self.outer_names = sorted(set(self.ckpt.names()) - {n for names in self.layer_names for n in names})

    @property
    def config(self):
        return self.model.config

    def layer_path(self, index: int) -> str:
        return f"{self.path}.{index}"

    # ------------------------------------------------------------------------ phases

    def start(self, batches: list[torch.Tensor]) -> list[Batch]:
        """Embed every batch of ids (B, T) and record what each layer is called with."""
        states = [Batch(ids, calls={}) for ids in batches]
        with self._outer(head=False), torch.no_grad():
            for state in states:
                with self._standing_in(_Catcher, state):
                    try:
                        self.model(input_ids=state.ids, attention_mask=torch.ones_like(state.ids), use_cache=False)
                    except _Stop:
                        pass
        return states

    def embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        """The input embedding table's rows for ids (B, T): (B, T, H) float32, without what a family adds
        in its forward (a scale, position embeddings). The table is read whole, then dropped."""
        with self._outer(head=False):
            return self.model.get_input_embeddings().weight[ids].detach()

    @contextmanager
    def loaded(self, index: int) -> Iterator[nn.Module]:
        """Decoder layer `index` with its weights in float32, in place in the model; dropped on exit.

        A fresh copy of the meta layer is loaded, so nothing it caches (packed experts) outlives it.
        """
        empty = self.layers[index]
        self.layers[index] = copy.deepcopy(empty)
        try:
            self._load(self.layer_names[index], self.layer_path(index) + ".")
            yield self.layers[index]
        finally:
            self.layers[index] = empty
            release_memory()

    @staticmethod
    def step(layer: nn.Module, index: int, states: list[Batch]) -> None:
        """Run every batch's hidden states through the loaded layer, in place."""
        with torch.no_grad():
            for state in states:
                args, kwargs = state.calls[index]
                state.hidden = layer(state.hidden, *args, **kwargs)

    def run(self, states: list[Batch], hooks: Callable[[int, nn.Module], AbstractContextManager] | None = None) -> None:
        """Every layer over every batch, in order; hooks(index, layer) is a context around each layer's run."""
        for index in range(len(self.layers)):
            self.run_layer(index, states, hooks)

    def run_layer(self, index: int, states: list[Batch],
                  hooks: Callable[[int, nn.Module], AbstractContextManager] | None = None) -> None:
        """One layer over every batch. A function of its own: the layer is freed when it returns, not
        when a loop variable is next rebound (after the next layer is loaded)."""
        with self.loaded(index) as layer, (hooks(index, layer) if hooks else nullcontext()):
            self.step(layer, index, states)

    @contextmanager
    def head(self) -> Iterator:
        """The final norm and head loaded: yields logits(state) -> (B, T, V) float32."""
        def logits(state: Batch) -> torch.Tensor:
            with self._standing_in(_Feeder, state), torch.no_grad():
                out = self.model(input_ids=state.ids, attention_mask=torch.ones_like(state.ids), use_cache=False)
            return out.logits.float()

        with self._outer():
            yield logits

    # ------------------------------------------------------------------------ weights

    @contextmanager
    def _outer(self, head: bool = True) -> Iterator[None]:
        """The weights outside the decoder layers (embeddings, final norm, head) loaded, then dropped.

        head=False leaves an untied output head out: the first phase stops before it (a 7B's is 0.5 GB).
        """
        skip = () if head or self.tied else tuple(f"{n}." for n in self._head_names())
        self._load([n for n in self.outer_names if not n.startswith(skip)], None, skip)
        try:
            yield
        finally:
            from accelerate.utils import set_module_tensor_to_device

            outer = [n for n, _ in self.model.named_parameters(remove_duplicate=False)
                     if not n.startswith(self.path + ".")]
            for name in outer:
                set_module_tensor_to_device(self.model, name, "meta")

    def _head_names(self) -> list[str]:
        """Module names of the output head (lm_head; a checkpoint may name it without the model's prefix)."""
        head = self.model.get_output_embeddings()
        return [n for n, m in self.model.named_modules() if m is head]

    def _load(self, names: list[str], prefix: str | None, skip: tuple[str, ...] = ()) -> None:
        """Read these checkpoint tensors into the model; every parameter under prefix (outside the
        layers and `skip` when None) must get one."""
        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.modeling_utils import LoadStateDictConfig

        tensors = {name: self.ckpt.read(name) for name in names}
        with quiet_transformers():
            convert_and_load_state_dict_in_model(self.model, tensors, LoadStateDictConfig(
                dtype=torch.float32, weight_mapping=self.mapping))
            if prefix is None:
                self.model.tie_weights()
        empty = [n for n, p in self.model.named_parameters(remove_duplicate=False) if p.is_meta
                 and (n.startswith(prefix) if prefix else not n.startswith((self.path + ".", *skip)))]
        if empty:
            raise MoeifyError(f"{self.folder} lacks {len(empty)} weight(s) its config needs (e.g. {empty[0]}); "
                              f"the checkpoint is incomplete or mis-named")

    @contextmanager
    def _standing_in(self, kind: type[_Catcher], state: Batch) -> Iterator[None]:
        """Every decoder layer replaced by a `kind` for one batch, then put back."""
        originals = list(self.layers)
        for i, layer in enumerate(originals):
            self.layers[i] = kind(layer, i, state, last=i == len(originals) - 1)
        try:
            yield
        finally:
            for i, layer in enumerate(originals):
                self.layers[i] = layer


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MAPPED = 1 << 20  # bytes: blocks at least this large get maps of their own


def map_large_blocks() -> None:
    """Serve blocks of 1 MB and more from maps of their own, unmapped when freed. glibc otherwise
    raises that threshold to the largest block freed so far (up to 32 MB), and the per-batch
    temporaries of a running layer (a few MB each) then fragment the heap: the resident set grew
    by ~150 MB over one layer's batches of a 1.1B model. Process-wide; no-op off glibc."""
    try:
        ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, MAPPED)
    except (OSError, AttributeError):
        pass


def release_memory() -> None:
    """Hand freed heap pages back to the system. glibc keeps some of each dropped layer's buffers
    otherwise, and the resident set grew by ~100 MB over 8 layers of a 1.1B model. No-op off glibc."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _skeleton(folder: Path, code: Code) -> nn.Module:
    """The model on the meta device (buffers such as rotary frequencies stay real), float32, eval mode."""
    from accelerate import init_empty_weights

    try:
        with init_empty_weights(), quiet_transformers():
            if code is Code.MOEIFY:
                from moeify.targets.remote_code.configuration_moeify import MoeifyConfig
                from moeify.targets.remote_code.modeling_moeify import MoeifyForCausalLM

                model = MoeifyForCausalLM(MoeifyConfig.from_pretrained(folder))
            else:
                from transformers import AutoConfig, AutoModelForCausalLM

                trusted = code is Code.FOLDER
                config = AutoConfig.from_pretrained(folder, trust_remote_code=trusted)
                model = AutoModelForCausalLM.from_config(config, trust_remote_code=trusted, dtype=torch.float32)
    except MoeifyError:
        raise
    except Exception as e:  # includes the remote config's ValueErrors (a bad moe field, a non-FFN mlp_path)
        raise MoeifyError(f"cannot build {folder} as a causal LM ({type(e).__name__}: {e})") from None
    model.tie_weights()  # tied embeddings are one parameter, as in a loaded model (parameter counts)
    return model.float().eval()


def _decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The path and list of the decoder layers: the outermost ModuleList (expert lists sit inside layers)."""
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and name]
    if not lists:
        raise MoeifyError(f"{type(model).__name__} has no list of decoder layers that moeify can run layer by layer")
    return max(lists, key=lambda item: (-item[0].count("."), len(item[1])))


def _names_by_layer(names: list[str], leaf: str, count: int) -> list[list[str]]:
    """Checkpoint tensor names of each decoder layer (`<leaf>.<i>.` anywhere in the name)."""
    pattern = re.compile(rf"(?:^|\.){re.escape(leaf)}\.(\d+)\.")
    by_layer: list[list[str]] = [[] for _ in range(count)]
    for name in names:
        match = pattern.search(name)
        if match and int(match.group(1)) < count:
            by_layer[int(match.group(1))].append(name)
    return by_layer
