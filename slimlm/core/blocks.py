"""The block-by-block calibration pass that every method runs in: what enters a decoder block, the
context a method sees of the block it compresses, and the report methods write to.

`slimlm.compress.engine` drives the pass over a recipe's stages; methods (`slimlm.quant`, `slimlm.prune`,
...) use what is here to run the block on its cached inputs and to collect its linears' inputs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import PreTrainedModel

from slimlm.errors import SlimlmError
from slimlm.models.adapter import BlockAdapter, ModelAdapter, is_linear
from slimlm.progress import progress

if TYPE_CHECKING:
    from slimlm.core.stage import Stage


class _InputsCaptured(Exception):
    """Raised by the hook on the first block once its inputs are stored: the rest of the model is not needed."""


class _InputsCollected(Exception):
    """Raised inside a block once every module of interest has seen its input: the rest is not needed."""


@dataclass
class BlockInputs:
    """Calibration activations entering a block, one entry per batch of segments, with the other arguments
    the model's own forward passes that block (attention mask, rotary position embeddings, ...)."""

    hidden: list[torch.Tensor]
    args: list[tuple]
    kwargs: list[dict]
    # The (args, kwargs) per batch that each later block gets from the model's forward, in order. Blocks
    # differ where the layers differ in attention type: Gemma 2/3 give sliding-window and full-attention
    # layers their own mask and rotary embedding, Qwen2 its layers past max_window_layers another mask.
    later: list[tuple[list[tuple], list[dict]]] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return sum(h.shape[0] * h.shape[1] for h in self.hidden)

    def following(self, hidden: list[torch.Tensor]) -> BlockInputs:
        """What enters the next block: `hidden` (this block's outputs) with the arguments the model gives that
        block. After the last block only the hidden states mean anything (the last block's arguments stay)."""
        if not self.later:
            return BlockInputs(hidden, self.args, self.kwargs)
        (args, kwargs), *rest = self.later
        return BlockInputs(hidden, args, kwargs, rest)


@dataclass
class BlockContext:
    """What a method sees of the block it processes."""

    model: PreTrainedModel
    adapter: ModelAdapter
    index: int
    block: nn.Module
    targets: dict[str, str]  # full module name -> role, the stage's targets in this block
    inputs: BlockInputs | None  # None when no stage of the recipe calibrates
    device: torch.device
    # A method may set the next block's inputs itself (AWQ propagates float outputs); by default the
    # engine runs the compressed block to get them.
    next_inputs: list[torch.Tensor] | None = None
    # This block's entry of the stage's whole-model plan (`Stage.plan`; OWL: the block's sparsity), or None.
    plan: Any = None
    # The block's (out, in) linear weights before any stage of the recipe changed the block, by full module
    # name; kept only when a stage asks for them (`Stage.needs_original_weights`), else None.
    original_weights: dict[str, torch.Tensor] | None = None

    def module(self, name: str) -> nn.Module:
        return self.model.get_submodule(name)

    def replace(self, name: str, new: nn.Module) -> None:
        replace_module(self.model, name, new)

    def run(self) -> list[torch.Tensor]:
        """The block's outputs on every cached input batch (hooks attached by the caller fire)."""
        if self.inputs is None:
            raise SlimlmError("this method needs calibration data, but the run has none")
        return run_block(self.block, self.inputs)

    def collect(self, modules: dict[str, nn.Module], sink: Callable[[str, torch.Tensor], None]) -> None:
        """Pass (name, input) of each module to `sink` on every cached batch, running the block only as
        far as the last of these modules needs (the MLP is skipped when only attention inputs are wanted).
        True-sequential methods collect group by group through `slimlm.core.sequential.SequentialPass`."""
        if self.inputs is None:
            raise SlimlmError("this method needs calibration data, but the run has none")
        collect_block_inputs(self.block, self.inputs, modules, sink)

    def names_with_roles(self, roles: tuple[str, ...]) -> list[str]:
        return [name for name, role in self.targets.items() if role in roles]


@dataclass
class LayerReport:
    name: str
    method: str
    seconds: float
    error: float | None = None  # the method's own error measure (GPTQ: sum of the OBS losses)


@dataclass
class CompressionReport:
    layers: list[LayerReport] = field(default_factory=list)
    seconds: float = 0.0
    peak_rss_bytes: int = 0
    peak_device_bytes: int | None = None
    calibration_tokens: int = 0
    block_sparsity: dict[int, list[float]] = field(default_factory=dict)  # stage index -> planned sparsity per block
    structure: list[dict] = field(default_factory=list)  # what structural stages (layer removal, ...) did
    float_storage: str = "float32"  # the dtype the uncompressed float parameters were rounded to
    notes: dict[str, object] = field(default_factory=dict)  # choices made at run time (e.g. AWQ's search dtype)

    def to_dict(self) -> dict:
        return {
            "seconds": self.seconds,
            "peak_rss_bytes": self.peak_rss_bytes,
            "peak_device_bytes": self.peak_device_bytes,
            "calibration_tokens": self.calibration_tokens,
            "block_sparsity": self.block_sparsity,
            "structure": self.structure,
            "float_storage": self.float_storage,
            "notes": self.notes,
            "layers": [vars(layer) for layer in self.layers],
        }


def block_output(output) -> torch.Tensor:
    """Decoder blocks return a tensor (transformers >= 5) or a tuple whose first item is the hidden state."""
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def run_block(block: nn.Module, inputs: BlockInputs) -> list[torch.Tensor]:
    return [block_output(block(h, *a, **k)) for h, a, k in zip(inputs.hidden, inputs.args, inputs.kwargs)]


@torch.no_grad()
def dense_block_passes(
    model: PreTrainedModel, adapter: ModelAdapter, calibration: torch.Tensor, batch_size: int, device: torch.device,
    desc: str, pre_hooks: Callable[[BlockAdapter], list[tuple[nn.Module, Callable]]] | None = None,
) -> Iterator[tuple[BlockAdapter, BlockInputs, list[torch.Tensor]]]:
    """Run the calibration segments through the blocks in turn (each on `device` for its turn), with the
    forward pre-hooks `pre_hooks(block)` names attached during its pass; yield (block, what entered it,
    what left it). The model is not changed: each block reads the previous block's outputs."""
    inputs = capture_block_inputs(model, adapter, calibration, batch_size, device)
    for block in progress(adapter, desc=desc, total=len(adapter)):
        handles = [module.register_forward_pre_hook(hook) for module, hook in (pre_hooks(block) if pre_hooks else [])]
        try:
            with on_device([block.module], device):
                outputs = run_block(block.module, inputs)
        finally:
            for handle in handles:
                handle.remove()
        yield block, inputs, outputs
        inputs = inputs.following(outputs)


@torch.no_grad()
def capture_block_inputs(
    model: PreTrainedModel, adapter: ModelAdapter, calibration: torch.Tensor, batch_size: int, device: torch.device
) -> BlockInputs:
    """Run the calibration segments through the model's own forward and keep what enters the first block,
    and what arguments besides the hidden states every block gets (see `BlockInputs.later`).

    The blocks are not computed: each passes its input through (returned in the form the real block's output
    has), and the pass stops at the last block, so this costs the embeddings and one block on one batch."""
    blocks = list(adapter.blocks)
    calls: list[tuple[list[tuple], list[dict]]] = [([], []) for _ in blocks]
    hidden: list[torch.Tensor] = []

    def recorder(index: int):
        def hook(_module, args, kwargs):
            kwargs = dict(kwargs)
            x = args[0] if args else kwargs.pop("hidden_states")
            calls[index][0].append(tuple(args[1:]))
            calls[index][1].append(kwargs)
            if index == 0:
                hidden.append(x)
            if index == len(blocks) - 1:
                raise _InputsCaptured
        return hook

    handles = [block.register_forward_pre_hook(recorder(i), with_kwargs=True) for i, block in enumerate(blocks)]
    try:
        with on_device(_non_block_modules(model, adapter), device), _passing_through(blocks[:-1], device):
            for start in progress(range(0, len(calibration), batch_size), desc="capture inputs"):
                try:
                    model(input_ids=calibration[start : start + batch_size].to(device), use_cache=False)
                except _InputsCaptured:
                    pass
    finally:
        for handle in handles:
            handle.remove()
    (args, kwargs), *later = calls
    return BlockInputs(hidden, args, kwargs, later)


@contextmanager
def _passing_through(blocks: list[nn.Module], device: torch.device) -> Iterator[None]:
    """Let `blocks` return their input hidden states instead of computing, in the form the real output has
    (a tensor, or a tuple whose first item is the hidden states): the first call runs the real forward once
    (the block on `device` for it) to learn that form."""
    form: dict[str, tuple | None] = {}

    def pass_through(block: nn.Module, hidden_states: torch.Tensor, *args, **kwargs):
        if "extra" not in form:
            with on_device([block], device):
                output = type(block).forward(block, hidden_states, *args, **kwargs)
            form["extra"] = tuple(output[1:]) if isinstance(output, (tuple, list)) else None
        return hidden_states if form["extra"] is None else (hidden_states, *form["extra"])

    saved = [block.__dict__.get("forward") for block in blocks]
    for block in blocks:
        block.forward = functools.partial(pass_through, block)
    try:
        yield
    finally:
        for block, forward in zip(blocks, saved):
            if forward is None:
                del block.forward
            else:
                block.forward = forward


def _non_block_modules(model: PreTrainedModel, adapter: ModelAdapter) -> list[nn.Module]:
    """Modules the forward pass needs before the first block: the blocks' siblings, the embeddings."""
    parent_name = adapter.blocks_name.rpartition(".")[0]
    parent = model.get_submodule(parent_name) if parent_name else model
    return [m for m in parent.children() if m is not adapter.blocks] + [adapter.embedding]


@contextmanager
def on_device(modules: list[nn.Module], device: torch.device) -> Iterator[None]:
    """Move modules to `device` for the duration, then back where their parameters were."""
    homes = [next(m.parameters(), torch.empty(0)).device for m in modules]
    for module in modules:
        module.to(device)
    try:
        yield
    finally:
        for module, home in zip(modules, homes):
            module.to(home)


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The (out, in) weight of a linear, whichever way it is stored (GPT-2's Conv1D keeps (in, out))."""
    if getattr(module, "is_compressed_linear", False):
        raise SlimlmError(f"{type(module).__name__} is already compressed by an earlier stage: "
                          "give the stages disjoint targets, or quantize last")
    if not is_linear(module):
        raise SlimlmError(f"{type(module).__name__} is not a linear layer")
    return module.weight if isinstance(module, nn.Linear) else module.weight.T


@torch.no_grad()
def collect_block_inputs(
    block: nn.Module, inputs: BlockInputs, modules: dict[str, nn.Module], sink: Callable[[str, torch.Tensor], None]
) -> None:
    """Run `block` on each input batch until every module has received its input (see BlockContext.collect).

    Where the modules all read one tensor on the first batch (q, k and v; gate and up), later batches stop at
    the first of them: the others would get the same tensor, and computing the first ones' outputs is waste."""
    pending: set[str] = set()
    first_inputs: dict[str, torch.Tensor] | None = {}  # what each module got on the first batch, then None
    shared = False

    def hook_for(name: str):
        def hook(_module, args):
            if shared:
                for each in modules:
                    sink(each, args[0])
                raise _InputsCollected
            sink(name, args[0])
            if first_inputs is not None:
                first_inputs[name] = args[0]
            pending.discard(name)
            if not pending:
                raise _InputsCollected
        return hook

    handles = [module.register_forward_pre_hook(hook_for(name)) for name, module in modules.items()]
    try:
        for hidden, args, kwargs in zip(inputs.hidden, inputs.args, inputs.kwargs):
            pending.update(modules)
            try:
                block(hidden, *args, **kwargs)
            except _InputsCollected:
                pass
            if first_inputs is not None:
                seen = list(first_inputs.values())
                shared = len(modules) > 1 and len(seen) == len(modules) and all(x is seen[0] for x in seen)
                first_inputs = None
    finally:
        for handle in handles:
            handle.remove()


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where the submodule `name` (a full dotted name) is."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def original_block_weights(adapter: ModelAdapter, index: int) -> dict[str, torch.Tensor]:
    """Copies of block `index`'s float linear weights, (out, in), by full module name."""
    prefix = f"{adapter.blocks_name}.{index}."
    block = adapter[index]
    return {prefix + block.linear_names[role]: linear_weight(module).detach().clone()
            for role, module in block.linears.items() if not getattr(module, "is_compressed_linear", False)}


def block_targets(adapter: ModelAdapter, index: int, stage: Stage, selected: set[str]) -> dict[str, str]:
    """The stage's selected linears in block `index`: full module name -> role."""
    block = adapter[index]
    prefix = f"{adapter.blocks_name}.{index}."
    return {prefix + block.linear_names[role]: role for role in block.linears if prefix + block.linear_names[role] in selected}
