"""The block pass of true-sequential methods, each linear computed once.

GPTQ's reference code calibrates a block's linears in groups (q/k/v, then o, then gate/up, then down),
each on inputs produced by the already-compressed groups before it. Run naively, every group re-runs the
block from its input: q/k/v and attention twice, gate and up twice, plus a last full pass for the next
block's inputs. A pre-norm decoder block is two residual branches,

    r   = h + attn_out_norm(o(a))              a: o's input, the attention output before its projection
    out = r + mlp_out_norm(down(d))            d: down's input; r: the residual stream entering the MLP half
        = r + mlp_out_norm(mlp(mlp_norm(r)))

(`attn_out_norm`, `mlp_out_norm`: Gemma 2/3's sandwich norms; absent elsewhere), so the pass keeps `a`
once it has been collected and gets r from it by running o alone; it keeps r and runs only the MLP half for
gate/up and down; and it keeps `d` (where memory allows) and gets the block's output by running down alone.
Each linear of the block is then computed once per calibration batch, with its final weights.

Nothing is assumed: the decomposition is checked against the real block on the first calibration batch
(`BlockBranches.check`, once per kind of block in a run), and a block built otherwise (parallel attention
and MLP as in GPT-NeoX and Phi, post-norm OPT) runs whole, as before.

Valid under the true-sequential contract: after a group's inputs are collected, only that group's linears
change before the next group is collected.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from slimlm.core.blocks import (
    BlockContext,
    BlockInputs,
    block_output,
    collect_block_inputs,
    run_block,
)
from slimlm.core.memory import available_memory
from slimlm.models.adapter import NORM_READERS, BlockAdapter, linear_shape

_RESIDUAL = "<residual stream>"  # sink names no module has
_BRANCH = "<attention output>"


class ResidualMlp(nn.Module):
    """The MLP half of a pre-norm decoder block: r -> r + mlp_out_norm(mlp(mlp_norm(r)))."""

    def __init__(self, mlp: nn.Module, norm: nn.Module, out_norm: nn.Module | None):
        super().__init__()
        self.mlp, self.norm, self.out_norm = mlp, norm, out_norm

    def forward(self, residual: torch.Tensor) -> torch.Tensor:
        out = self.mlp(self.norm(residual))
        return residual + (self.out_norm(out) if self.out_norm is not None else out)


def residual_branch(residual: torch.Tensor, linear: nn.Module, branch_input: torch.Tensor,
                    out_norm: nn.Module | None) -> torch.Tensor:
    """residual + out_norm(linear(branch_input)): the end of a pre-norm block's attention or MLP branch."""
    out = linear(branch_input)
    return residual + (out_norm(out) if out_norm is not None else out)


@dataclass
class BlockBranches:
    """The parts of one block the shortcuts run: o and its output norm, the MLP half, down and its norm."""

    o: nn.Module | None
    attn_out_norm: nn.Module | None
    mlp: ResidualMlp | None
    down: nn.Module | None
    mlp_out_norm: nn.Module | None

    @classmethod
    def of(cls, block: BlockAdapter) -> BlockBranches:
        """The block's parts as they are now (a compressed linear replaces the adapter's module)."""
        mlp, norm = block.mlp_module(), block.norms.get("mlp_norm")
        mlp_out_norm = block.norms.get("mlp_out_norm")
        live = {role: block.module.get_submodule(name) for role, name in block.linear_names.items()}
        return cls(live.get("o"), block.norms.get("attn_out_norm"),
                   ResidualMlp(mlp, norm, mlp_out_norm) if mlp is not None and norm is not None else None,
                   live.get("down"), mlp_out_norm)

    def key(self, block: nn.Module) -> tuple:
        """What decides the block's structure: its classes (one check serves every block alike)."""
        parts = (block, self.o, self.attn_out_norm, self.mlp and self.mlp.mlp, self.mlp and self.mlp.norm,
                 self.down, self.mlp_out_norm)
        return tuple(type(part).__name__ if part is not None else None for part in parts)

    @torch.no_grad()
    def check(self, block: nn.Module, inputs: BlockInputs) -> tuple[bool, bool, bool]:
        """Run the real block on the first batch and compare: (r from o's input, the MLP half from r,
        the output from down's input) each reproduce the block."""
        if self.mlp is None:
            return False, False, False
        seen: dict[str, torch.Tensor] = {}
        watched = {"r": self.mlp.norm, "a": self.o, "d": self.down}
        handles = [module.register_forward_pre_hook(lambda _m, args, key=key: seen.setdefault(key, args[0]))
                   for key, module in watched.items() if module is not None]
        try:
            output = block_output(block(inputs.hidden[0], *inputs.args[0], **inputs.kwargs[0]))
        finally:
            for handle in handles:
                handle.remove()
        if "r" not in seen:
            return False, False, False
        r, h = seen["r"], inputs.hidden[0]
        attention = "a" in seen and _close(residual_branch(h, self.o, seen["a"], self.attn_out_norm), r)
        half = _close(self.mlp(r), output)
        down = half and "d" in seen and _close(residual_branch(r, self.down, seen["d"], self.mlp_out_norm), output)
        return attention, half, down


def _close(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    return actual.shape == expected.shape and torch.allclose(
        actual, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


class SequentialPass:
    """Collect a block's linears' inputs group by group in the true-sequential order (see the module
    docstring), computing each linear once; `outputs()` is the compressed block's output, or None where the
    shortcuts did not apply (the engine then runs the block)."""

    def __init__(self, context: BlockContext):
        self.context = context
        self.block = context.adapter[context.index]
        self.branches = BlockBranches.of(self.block)
        self.valid = self._checked()
        self.branch_inputs: list[torch.Tensor] | None = None  # a: o's inputs
        self.residual: list[torch.Tensor] | None = None  # r
        self.mlp_inner: list[torch.Tensor] | None = None  # d: down's inputs

    def _checked(self) -> tuple[bool, bool, bool]:
        """The branch check, once per kind of block in a run (kept on the adapter, which lives one run)."""
        context = self.context
        checks = context.adapter.__dict__.setdefault("_branch_checks", {})
        key = self.branches.key(context.block)
        if key not in checks:
            checks[key] = self.branches.check(context.block, context.inputs)
        return checks[key]

    def collect(self, roles: tuple[str, ...], modules: dict[str, nn.Module],
                sink: Callable[[str, torch.Tensor], None]) -> None:
        """Pass (name, input) of each of `modules` (the linears of `roles`) to `sink` on every batch."""
        attention_ok, half_ok, down_ok = self.valid
        if set(roles) <= set(NORM_READERS["mlp_norm"]) and half_ok:
            self._ensure_residual()
            self._collect_half(modules, sink)
            return
        if roles == ("down",) and half_ok and self.residual is not None:
            self._collect_down(modules, sink, keep=down_ok and self._room_for_down_inputs())
            return
        keep = roles == ("o",) and attention_ok
        extra = {_BRANCH: self.branches.o} if keep else {}
        inputs = [] if keep else None

        def split(name: str, x: torch.Tensor) -> None:
            inputs.append(x) if name == _BRANCH else sink(name, x)

        self.residual = self.mlp_inner = None  # from now on only a group's own, later collection is valid
        collect_block_inputs(self.context.block, self.context.inputs, {**modules, **extra}, split)
        self.branch_inputs = inputs

    def _ensure_residual(self) -> None:
        """r for every batch: from the kept o inputs (o alone), else from a pass through the attention half."""
        if self.residual is not None:
            return
        inputs = self.context.inputs
        self.branches = BlockBranches.of(self.block)  # o is compressed by now
        if self.branch_inputs is not None:
            with torch.no_grad():
                self.residual = [residual_branch(h, self.branches.o, a, self.branches.attn_out_norm)
                                 for h, a in zip(inputs.hidden, self.branch_inputs)]
            self.branch_inputs = None
            return
        residual: list[torch.Tensor] = []
        collect_block_inputs(self.context.block, inputs, {_RESIDUAL: self.branches.mlp.norm},
                             lambda _name, x: residual.append(x))
        self.residual = residual

    def _collect_half(self, modules: dict[str, nn.Module], sink: Callable[[str, torch.Tensor], None]) -> None:
        collect_block_inputs(self.branches.mlp, _plain(self.residual), modules, sink)

    def _collect_down(self, modules: dict[str, nn.Module], sink: Callable[[str, torch.Tensor], None],
                      keep: bool) -> None:
        """down's inputs through the MLP half; with `keep`, also kept (d) for `outputs`."""
        inner: list[torch.Tensor] = []

        def sink_and_keep(name: str, x: torch.Tensor) -> None:
            sink(name, x)
            inner.append(x)  # down is the group's only linear: one tensor per batch

        self._collect_half(modules, sink_and_keep if keep else sink)
        self.mlp_inner = inner if keep else None

    def _room_for_down_inputs(self) -> bool:
        """Keep d only where it takes at most half of the memory still free (it is wider than the hidden
        states: MLP width / model width times the size of the cached block inputs)."""
        width = linear_shape(self.branches.down)[0]
        hidden = self.context.inputs.hidden
        need = sum(h.shape[0] * h.shape[1] for h in hidden) * width * hidden[0].element_size()
        free = available_memory(hidden[0].device)
        return free is None or need <= free // 2

    @torch.no_grad()
    def outputs(self) -> list[torch.Tensor] | None:
        """The block's output on every batch from what was kept, or None (then the block must run)."""
        if self.residual is None:
            return None
        self.branches = BlockBranches.of(self.block)  # down is compressed by now
        if self.mlp_inner is not None:
            return [residual_branch(r, self.branches.down, d, self.branches.mlp_out_norm)
                    for r, d in zip(self.residual, self.mlp_inner)]
        return run_block(self.branches.mlp, _plain(self.residual))


def _plain(hidden: list[torch.Tensor]) -> BlockInputs:
    return BlockInputs(hidden, [()] * len(hidden), [{}] * len(hidden))
