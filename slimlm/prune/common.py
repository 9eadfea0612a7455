"""What the unstructured pruning methods share: the block's sparsity, the mask from a score, stats collection."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from slimlm.core.blocks import BlockContext, CompressionReport, LayerReport, linear_weight
from slimlm.core.hessian import SharedInputs
from slimlm.core.sparsity import apply_mask_, n_m_mask, unstructured_mask
from slimlm.core.statistics import ChannelStatistics
from slimlm.errors import SlimlmError
from slimlm.models.adapter import BlockAdapter, ModelAdapter

if TYPE_CHECKING:
    from slimlm.prune.fields import PruneFields


def block_sparsity(context: BlockContext, stage: PruneFields) -> float:
    """The stage's sparsity, or this block's OWL sparsity when the recipe asks for OWL."""
    return context.plan if context.plan is not None else stage.sparsity


def mask_from_score(score: torch.Tensor, stage: PruneFields, sparsity: float, per_row: bool = True) -> torch.Tensor:
    """True where pruned: the lowest scores of each M-group (N:M), of each row, or of the layer."""
    if stage.n_m is not None:
        return n_m_mask(score, *stage.n_m)
    return unstructured_mask(score, sparsity, per_row)


def collect_statistics(context: BlockContext, factory: Callable[[int], Any] | None = None) -> SharedInputs:
    """One calibration pass over the block feeding each target linear's input to an accumulator from
    `factory(in_features)` (default: ChannelStatistics), shared between linears that read one tensor."""
    statistics = SharedInputs(factory or (lambda columns: ChannelStatistics(columns, context.device)))
    context.collect({name: context.module(name) for name in context.targets}, statistics.add)
    return statistics


def prune_targets(context: BlockContext, report: CompressionReport, method: str,
                  mask_of: Callable[[str, str, torch.Tensor], torch.Tensor]) -> None:
    """Zero each target linear's weights where `mask_of(name, role, weight)` is True, timing each."""
    for name, role in context.targets.items():
        start = time.perf_counter()
        module = context.module(name)
        weight = linear_weight(module)
        apply_mask_(module, weight, mask_of(name, role, weight))
        report.layers.append(LayerReport(name, method, time.perf_counter() - start))


def wanda_score(weight: torch.Tensor, statistics: ChannelStatistics) -> torch.Tensor:
    """|W_ij| * ||X_j||_2 (Wanda, Eq. 1)."""
    return weight.detach().abs().float() * statistics.squared_norm_per_sample().sqrt()[None, :]


# Structured pruning (LLM-Pruner, FLAP): cut whole heads and channels out of a block's linears.

def sliced_linear(module: nn.Linear, rows: torch.Tensor | None = None, columns: torch.Tensor | None = None) -> nn.Linear:
    weight = module.weight.detach()
    weight = weight[rows] if rows is not None else weight
    weight = weight[:, columns] if columns is not None else weight
    bias = None if module.bias is None else module.bias.detach()
    bias = bias[rows] if bias is not None and rows is not None else bias
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype, device=weight.device)
    new.weight.data.copy_(weight)
    if bias is not None:
        new.bias.data.copy_(bias)
    return new


def replace_linear(block: BlockAdapter, role: str, new: nn.Module) -> None:
    parent_name, _, child = block.linear_names[role].rpartition(".")
    setattr(block.module.get_submodule(parent_name) if parent_name else block.module, child, new)
    block.linears[role] = new


def prune_block_(block: BlockAdapter, q_keep: torch.Tensor, kv_keep: torch.Tensor, channel_keep: torch.Tensor,
                 head_dim: int) -> None:
    """Cut the block's linears down to the kept query heads, KV heads and MLP channels."""
    def rows(heads: torch.Tensor) -> torch.Tensor:
        return (heads[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)

    lin = dict(block.linears)
    replace_linear(block, "q", sliced_linear(lin["q"], rows=rows(q_keep)))
    replace_linear(block, "k", sliced_linear(lin["k"], rows=rows(kv_keep)))
    replace_linear(block, "v", sliced_linear(lin["v"], rows=rows(kv_keep)))
    replace_linear(block, "o", sliced_linear(lin["o"], columns=rows(q_keep)))
    for role in ("gate", "up"):
        if role in lin:
            replace_linear(block, role, sliced_linear(lin[role], rows=channel_keep))
    replace_linear(block, "down", sliced_linear(lin["down"], columns=channel_keep))


MLP_WIDTH_KEYS = ("intermediate_size", "ffn_dim", "n_inner")


def attention_shape(config) -> tuple[int, int, int]:
    """(query heads, KV heads, head dimension) a config describes (KV heads = query heads without GQA)."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return heads, kv_heads, getattr(config, "head_dim", None) or config.hidden_size // heads


def set_block_shape_(model: nn.Module, heads: int, kv_heads: int, width: int, head_dim: int) -> None:
    """Make the config (and the attention modules' cached counts) describe blocks that all have
    `heads` query heads, `kv_heads` KV heads and an MLP `width`, so plain `from_pretrained` rebuilds them."""
    config = model.config
    config.head_dim = head_dim  # explicit: it no longer equals hidden_size / num_attention_heads
    config.num_attention_heads = heads
    if hasattr(config, "num_key_value_heads"):
        config.num_key_value_heads = kv_heads
    setattr(config, next(key for key in MLP_WIDTH_KEYS if getattr(config, key, None)), width)
    for module in model.modules():  # attention modules cache head counts at construction
        if hasattr(module, "num_heads"):
            module.num_heads = heads
        if hasattr(module, "num_key_value_heads"):
            module.num_key_value_heads = kv_heads
        if hasattr(module, "num_key_value_groups"):
            module.num_key_value_groups = heads // kv_heads


BIAS_SWITCHES = {"attention_bias": ("q", "k", "v", "o"), "mlp_bias": ("gate", "up", "down")}


def declare_biases_(model: nn.Module, adapter: ModelAdapter) -> None:
    """Where some linears gained a bias (FLAP's compensation) and the config has an off switch for
    that family's biases, turn it on and give the other linears it governs a zero bias, so plain
    `from_pretrained` builds the same modules; the outputs do not change. Kept only if the model
    class really builds exactly those biases (checked on the meta device), else undone."""
    config = model.config
    for switch, roles in BIAS_SWITCHES.items():
        linears = [block.linears[r] for block in adapter for r in roles if r in block.linears]
        if getattr(config, switch, None) is not False or all(linear.bias is None for linear in linears):
            continue
        setattr(config, switch, True)
        if not _builds_biases(model, roles):
            setattr(config, switch, False)
            continue
        for linear in linears:
            if linear.bias is None:
                linear.bias = nn.Parameter(torch.zeros(linear.out_features, dtype=linear.weight.dtype,
                                                       device=linear.weight.device))


def _builds_biases(model: nn.Module, roles: tuple[str, ...]) -> bool:
    """Whether the model class, built from the current config, puts a bias on every linear of `roles`."""
    with torch.device("meta"):
        fresh = ModelAdapter(type(model)(model.config))[0]
    return all(fresh.linears[r].bias is not None for r in roles if r in fresh.linears)


def require_separate_projections(adapter, method: str) -> None:
    """Structured pruning that cuts heads and channels needs separate q/k/v/o and up/down linears."""
    roles = set(adapter[0].linears)
    if not {"q", "k", "v", "o", "up", "down"} <= roles:
        raise SlimlmError(f"{method} needs separate q/k/v/o and up/down projections; this {adapter.family} "
                          f"model has {sorted(roles)} (fused qkv is not supported)")
